"""``pand export format=timm``: a student as a folder timm's own factory loads (``local-dir:``), with pand's logits,
class names and preprocessing; the students timm cannot build alone refused with the reason and nothing written.

The checkpoints are made without training: the run's config composed as ``pand train`` would, a student built from
it with random weights (batch-norm statistics too, so a tensor written under the wrong name shows in the logits).
"""

import json
import math

import pytest
import timm
import torch

from pand.checkpoint_files import RECORD_KEY, STUDENT_PREFIX
from pand.cli import main
from pand.config import compose, to_plain
from pand.deploy import load_student
from pand.errors import ConfigError, PandError
from pand.export import export_student
from pand.export_timm import crop_pct
from pand.io import is_output_folder
from pand.networks.timm_twins import timm_state_dict
from pand.students import build_student
from pand.students.open_vocab import OpenVocabStudent
from tests.engine.conftest import tiny_overrides

NAMES = ["heron", "gull", "tern"]
SIDE = 32


def _checkpoint(path, *overrides, open_vocab=False):
    """A pand checkpoint of a randomly initialised student of ``overrides`` (the config ``pand train`` composes)."""
    method = "method=openvocab" if open_vocab else "method=ce"
    config = to_plain(compose("train", tiny_overrides(path.parent / "data", path.parent / "run", method, *overrides)))
    s = config["student"]
    torch.manual_seed(0)
    student = build_student(s["name"], len(NAMES), source=s["source"], pretrained=False, image_size=SIDE,
                            kwargs=s.get("kwargs"))
    if open_vocab:
        student = OpenVocabStudent(student, 16, head="linear", input_size=(3, SIDE, SIDE),
                                   vocabulary=torch.nn.functional.normalize(torch.randn(len(NAMES), 16), dim=-1))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    state = {STUDENT_PREFIX + k: v for k, v in student.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}, RECORD_KEY: {"classes": NAMES}}, path)
    return path


def _images(n=4):
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


def _timm_logits(folder, x):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return model, model(x)


def _student_logits(ckpt, x):
    with torch.no_grad():
        return load_student(ckpt).model(x)


@pytest.mark.parametrize("student,architecture", [("resnet18", "resnet18"), ("mobilenet_v2", "mobilenetv2_100")])
def test_torchvision_students_load_in_timm_as_their_twin(tmp_path, student, architecture):
    ckpt = _checkpoint(tmp_path / "best.ckpt", f"student={student}")
    out = tmp_path / "timm"
    result = export_student(ckpt, "timm", out)
    assert result["files"] == [str(out / "model.safetensors"), str(out / "config.json"), str(out / "student.json")]
    assert is_output_folder(out)

    x = _images()
    model, theirs = _timm_logits(out, x)
    assert type(model).__module__.startswith("timm.") and model.num_classes == 3
    assert (theirs - _student_logits(ckpt, x)).abs().max().item() <= 1e-5
    assert list(model.pretrained_cfg["label_names"]) == NAMES

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == architecture and config["num_classes"] == 3 and config["label_names"] == NAMES
    assert config["num_features"] == model.num_features and config["model_args"] == {}
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["interpolation"] == "bilinear"
    assert pcfg["crop_mode"] == "center" and pcfg["crop_pct"] == pytest.approx(32 / 36)
    assert pcfg["classifier"] == ("fc" if student == "resnet18" else "classifier") and pcfg["num_classes"] == 3
    # timm's own eval transform: short side to 36 px (the run's resize_size), centre crop 32, the run's mean and std
    data = timm.data.resolve_data_config({}, model=model)
    assert math.floor(32 / data["crop_pct"]) == 36 and data["interpolation"] == "bilinear"
    loaded = load_student(ckpt)
    assert list(data["mean"]) == loaded.config["data"]["mean"] and list(data["std"]) == loaded.config["data"]["std"]

    meta = json.loads((out / "student.json").read_text())
    assert meta == result["student"]
    assert meta["format"] == "timm" and meta["file"] == "model.safetensors"
    assert meta["files"] == ["model.safetensors", "config.json"] and meta["class_names"] == NAMES
    record = meta["timm"]
    assert record["architecture"] == architecture and f"torchvision {student} as timm {architecture}" in record["from"]
    assert record["load"] == f"timm.create_model('local-dir:{out}', pretrained=True)"
    assert 0 <= record["check"]["max_abs_logit_diff"] <= record["check"]["tolerance"] <= 1e-4
    assert record["preprocess"]["timm_resize_size"] == 36


def test_a_timm_student_keeps_its_names_and_kwargs(tmp_path):
    # a patch model: built for the run's 32 px through model_args, with its student.kwargs
    ckpt = _checkpoint(tmp_path / "best.ckpt", "student=timm", "student.name=vit_tiny_patch16_224",
                       "+student.kwargs.patch_size=8", "+student.kwargs.depth=2")
    out = tmp_path / "timm"
    meta = export_student(ckpt, "timm", out, class_names=NAMES)["student"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {"patch_size": 8, "depth": 2, "img_size": 32}
    assert config["pretrained_cfg"]["classifier"] == "head" and config["pretrained_cfg"]["fixed_input_size"] is True

    x = _images()
    model, theirs = _timm_logits(out, x)
    assert model.patch_embed.img_size == (32, 32) and len(model.blocks) == 2
    assert (theirs - _student_logits(ckpt, x)).abs().max().item() <= 1e-5
    # the weights are the student's under timm's own keys: backbone.X -> X, linear_cls -> head
    loaded = load_student(ckpt).model
    assert torch.equal(model.head.weight, loaded.linear_cls.weight)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, loaded.backbone.blocks[1].mlp.fc2.weight)
    assert meta["timm"]["from"] == "timm vit_tiny_patch16_224"


def _refused_through_the_cli(ckpt, out, capsys):
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    capsys.readouterr()
    assert main(["export", f"ckpt_path={ckpt}", "format=timm", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand export: error: format=timm cannot express this student: ")
    assert err.rstrip().endswith("nothing was written")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["best.ckpt", "out"]  # no staging folder left
    return err


def test_a_cifar_student_is_refused_with_the_formats_to_use(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.ckpt", "student=cifar", "student.name=resnet8")
    err = _refused_through_the_cli(ckpt, tmp_path / "out", capsys)
    assert "'resnet8' is one of pand's CIFAR networks (3x3 stem, no max-pool), which timm does not have; export " \
           "format=onnx, torch_export or safetensors instead" in err


def test_an_open_vocabulary_student_is_sent_to_format_open_clip(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.ckpt", "student=resnet18", "method.head=linear", open_vocab=True)
    err = _refused_through_the_cli(ckpt, tmp_path / "out", capsys)
    assert "it is an open-vocabulary student" in err and "export it with format=open_clip" in err


@pytest.mark.parametrize("overrides,message", [
    (("student=resnet18", "student.name=shufflenet_v2_x0_5"), "timm has no model with the weights and computation "
                                                              "of torchvision 'shufflenet_v2_x0_5'"),
    (("student=mobilenet_v2", "+student.kwargs.width_mult=0.5"), "torchvision student.kwargs width_mult change the "
                                                                  "network"),
    (("student=timm", "student.name=pand_vit_p4_32"), "'pand_vit_p4_32' is registered in timm by pand itself"),
])
def test_students_timm_cannot_build_alone_are_refused_before_anything_is_written(tmp_path, overrides, message):
    ckpt = _checkpoint(tmp_path / "best.ckpt", *overrides)
    with pytest.raises(ConfigError, match="format=timm cannot express this student") as caught:
        export_student(ckpt, "timm", tmp_path / "out")
    assert message in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]


def test_the_cli_exports_and_a_failed_check_writes_nothing(tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(tmp_path / "best.ckpt", "student=resnet18")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", f"ckpt_path={ckpt}", "format=timm", f"out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "timm" and printed["student"] == json.loads((out / "student.json").read_text())
    x = _images()
    assert (_timm_logits(out, x)[1] - _student_logits(ckpt, x)).abs().max().item() <= 1e-5

    monkeypatch.setattr("pand.export_timm.LOGIT_ATOL", -1.0)
    with pytest.raises(PandError, match=r"timm's model built from the exported folder differs from the student by "
                                        r"up to .* nothing was written"):
        export_student(ckpt, "timm", tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "out"]


def test_mobilenet_v2_tensors_are_matched_by_position_and_checked():
    import torchvision

    ours = torchvision.models.mobilenet_v2(num_classes=3).state_dict()
    theirs = {k: v.shape for k, v in timm.create_model("mobilenetv2_100", num_classes=3).state_dict().items()}
    renamed = timm_state_dict("mobilenet_v2", ours, theirs)
    assert list(renamed) == list(theirs) and renamed["conv_stem.weight"] is ours["features.0.0.weight"]
    assert renamed["classifier.weight"] is ours["classifier.1.weight"]
    swapped = dict(reversed(list(ours.items())))
    with pytest.raises(PandError, match="torchvision 'mobilenet_v2' and timm 'mobilenetv2_100' differ at"):
        timm_state_dict("mobilenet_v2", swapped, theirs)


def test_crop_pct_gives_timm_the_run_resize_size():
    for side in range(8, 400, 7):
        for resize in range(side, side * 2, 3):
            assert math.floor(side / crop_pct(side, resize)) == resize
