"""Classifier teachers: loaded from a weights file, a pand checkpoint or random (tests), frozen, checked against the
run's classes, and usable by every logit method through the same source interface as the CLIP teacher."""

import json

import pytest
import torch
from torch import nn

from pand.cli import main
from pand.errors import ConfigError, WeightsUnavailableError
from pand.teachers import LOGITS, LiveTeacherSource, load_classifier_teacher
from pand.teachers.classifier import create_classifier
from tests.engine.conftest import tiny_overrides

DATA = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CLASSES = ["a", "b", "c"]


def test_weights_file_round_trip_and_frozen(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("test_resnet", "timm", 3)
    path = tmp_path / "teacher.pth"
    torch.save(model.state_dict(), path)
    teacher = load_classifier_teacher({"model": "test_resnet", "weights": str(path)}, classes=CLASSES, data=DATA)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(teacher.outputs(x, {LOGITS})[LOGITS], model(x), atol=1e-6)
    assert teacher.identity["source"].startswith("file:") and teacher.identity["weights"]
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not teacher.model.training  # a parent's train() never unfreezes it


def test_a_teacher_for_other_classes_is_refused(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(create_classifier("test_resnet", "timm", 5).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not fit test_resnet with 3 classes"):
        load_classifier_teacher({"model": "test_resnet", "weights": str(path)}, classes=CLASSES, data=DATA)


def test_exactly_one_weights_origin_is_needed():
    with pytest.raises(ConfigError, match="exactly one of teacher.ckpt"):
        load_classifier_teacher({"model": "test_resnet"}, classes=CLASSES, data=DATA)
    with pytest.raises(ConfigError, match="neither a torchvision nor a timm model"):
        load_classifier_teacher({"model": "no_such_net", "pretrained": "random"}, classes=CLASSES, data=DATA)


def test_live_source_converts_the_batch_to_the_teachers_input():
    torch.manual_seed(0)
    teacher = load_classifier_teacher({"model": "test_vit", "pretrained": "random", "image_size": 160},
                                      classes=CLASSES, data=DATA)
    source = LiveTeacherSource(teacher, DATA["mean"], DATA["std"])
    out = source({"image": torch.randn(2, 3, 32, 32)}, {LOGITS})
    assert out[LOGITS].shape == (2, 3)
    with pytest.raises(ConfigError, match="cannot provide"):
        source({"image": torch.randn(2, 3, 32, 32)}, {"image_embeds"})


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_a_pand_trained_teacher_distils_into_a_student(cub_root, tmp_path, method):
    teacher_run = tmp_path / "teacher"
    assert main(["train", *tiny_overrides(cub_root, teacher_run, "method=ce", "trainer.max_epochs=1",
                                          "test=false")]) == 0
    ckpt = teacher_run / "checkpoints" / "best.ckpt"
    run = tmp_path / method
    assert main(["train", *tiny_overrides(cub_root, run, "teacher=classifier", f"teacher.ckpt={ckpt}",
                                          f"method={method}", "method.standardize=true", "student=timm",
                                          "student.name=test_resnet", "trainer.max_epochs=1")]) == 0
    summary = _summary(run)
    assert summary["method"] == method and summary["test_acc1"] is not None
    rows = (run / "metrics.csv").read_text()
    assert ("train/kd" if method == "kd" else "train/nckd") in rows


def test_kd_reads_a_clip_teachers_logits_live_and_from_the_cache(cub_root, tmp_path):
    for name, extra in (("live", ()), ("cached", (f"cache.dir={tmp_path / 'cache'}", "cache.views=2"))):
        run = tmp_path / name
        assert main(["train", *tiny_overrides(cub_root, run, "method=kd", "trainer.max_epochs=1", *extra)]) == 0
        assert _summary(run)["teacher"] == "pand-tiny-vit"


@pytest.mark.parametrize("method", [["method=nrkd"], ["method=pat", "method.embed_dim=32", "method.num_heads=4"]],
                         ids=["nrkd", "pat"])
def test_stage_feature_methods_run_with_a_clip_teacher(cub_root, tmp_path, method):
    # The CLIP teacher's stages are found in its image tower (open_clip's transformer.resblocks), live.
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, *method, "trainer.max_epochs=1")]) == 0
    summary = _summary(run)
    assert summary["teacher"] == "pand-tiny-vit" and summary["test_acc1"] is not None
    assert ("train/nrkd_feat" if method[0] == "method=nrkd" else "train/pat_mse") in (run / "metrics.csv").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher=classifier", "teacher.pretrained=random", "method=vl2lite"],
         "method 'vl2lite' reads ['image_embeds'], which a classifier teacher does not provide"),
        (["teacher=classifier", "teacher.pretrained=random", "method=nrkd", "cache.dir=/tmp/x", "cache.views=2"],
         "method 'nrkd' reads the teacher's stage features, which a teacher cache does not store"),
        (["teacher=classifier", "method=dkd"], "a classifier teacher needs exactly one of teacher.ckpt"),
        (["teacher=classifier", "teacher.pretrained=random", "method=kd", "teacher.text_features=/x.safetensors"],
         "method 'kd' with these options and a classifier teacher does not read learned text features"),
        (["method=dkd", "method.warmup_epochs=-1"], "method.warmup_epochs=-1 is not allowed"),
        (["teacher.kind=resnet"], "teacher.kind='resnet' is not allowed"),
    ],
)
def test_teacher_settings_are_checked_before_loading(cub_root, tmp_path, overrides, message, capsys):
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", *overrides)]) == 2
    assert message in capsys.readouterr().err


def test_a_cifar_network_as_the_teacher(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("resnet32x4", "auto", 3)
    path = tmp_path / "resnet32x4.pth"
    torch.save(model.state_dict(), path)
    teacher = load_classifier_teacher({"model": "resnet32x4", "weights": str(path)}, classes=CLASSES, data=DATA)
    assert teacher.outputs(torch.randn(2, 3, 32, 32), {LOGITS})[LOGITS].shape == (2, 3)
