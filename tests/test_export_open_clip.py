"""``pand export format=open_clip``: an open-vocabulary student as a folder open_clip's own factory loads, whose
similarities are pand's; the students open_clip cannot express refused with the reason and nothing written."""

import json

import open_clip
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pand.cli import main
from pand.deploy import load_student, preprocessing
from pand.errors import ConfigError, PandError
from pand.export import export_student
from pand.export_open_clip import vision_tower
from pand.io import is_output_folder
from pand.networks.stages import StageTap
from pand.students import build_student
from pand.students.open_vocab import OpenVocabStudent
from pand.teachers.registry import load_teacher
from tests.engine.conftest import tiny_overrides

SMALL = ("student=cifar", "student.name=resnet8")  # the quickest student to train, for the refusals


def _train(data, run, *extra):
    argv = tiny_overrides(data, run, "method=openvocab", "trainer.max_epochs=1", "test=false", *extra)
    assert main(["train", *argv]) == 0
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def resnet18_ckpt(data, tmp_path_factory):
    # torchvision resnet18: exported as timm's resnet18, which has its keys and computation
    return _train(data, tmp_path_factory.mktemp("runs") / "resnet18", "student=resnet18", "method.head=linear")


def _images(n=5, side=32):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(11))


def _open_clip_similarities(folder, images, names, templates):
    """Cosines of open_clip's encode_image with the prompt-ensemble of its encode_text, computed here by hand."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        rows = []
        for name in names:
            per_template = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
            rows.append(F.normalize(per_template.mean(dim=0), dim=-1))
        return model, preprocess, tokenizer, image @ torch.stack(rows).t()


def _pand_similarities(loaded, teacher, images, names):
    with torch.no_grad():
        text = teacher.class_embeddings(names, loaded.config["data"]["templates"])
        return loaded.model.embed(images) @ text.t()


def test_open_clip_loads_the_folder_and_gives_pand_similarities(resnet18_ckpt, tmp_path, capsys):
    out = tmp_path / "oc"
    capsys.readouterr()
    assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=open_clip", f"out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(out / "open_clip_model.safetensors"), str(out / "open_clip_config.json"),
                                str(out / "student.json")]
    assert is_output_folder(out)

    loaded = load_student(resnet18_ckpt)
    teacher = load_teacher(loaded.config, device="cpu")
    names, templates = loaded.class_names, loaded.config["data"]["templates"]
    x = _images()
    model, preprocess, tokenizer, theirs = _open_clip_similarities(out, x, names, templates)
    ours = _pand_similarities(loaded, teacher, x, names)
    assert (theirs - ours).abs().max().item() <= 1e-5
    with torch.no_grad():  # the logits too: open_clip's logit_scale is the run's
        torch.testing.assert_close(model.logit_scale.exp() * theirs, loaded.model(x), atol=1e-4, rtol=1e-5)
    assert model.logit_scale.exp().item() == pytest.approx(float(loaded.model.logit_scale), rel=1e-6)

    # encode_image is the student as timm's resnet18 with a biased projection; encode_text the teacher's own tower
    assert type(model.visual).__name__ == "TimmModel" and type(model.visual.trunk).__name__ == "ResNet"
    assert model.visual.head.proj.bias is not None
    teacher_text = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith(("visual.", "logit_"))}
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in teacher_text.items())
    prompts = [t.format(c) for c in names for t in templates]
    assert torch.equal(tokenizer(prompts), teacher.tokenizer(prompts))
    assert preprocess(PIL.Image.new("RGB", (50, 40), (90, 120, 200))).shape == (3, 32, 32)

    meta = json.loads((out / "student.json").read_text())
    shown = printed["student"]  # the CLI prints the text matrix as its shape
    assert {**shown, "open_vocabulary": meta["open_vocabulary"]} == meta and "3 x 32" in shown["open_vocabulary"][
        "text_matrix"]
    assert meta["format"] == "open_clip" and meta["class_names"] == names
    assert meta["preprocessing"] == preprocessing(loaded.config)
    assert meta["teacher"] == teacher.identity
    record = meta["open_clip"]
    assert record["image_tower"]["timm_model_name"] == "resnet18" and "torchvision resnet18" in record[
        "image_tower"]["from"]
    check = record["check"]
    assert 0 <= check["max_abs_similarity_diff"] <= 1e-5 and check["tolerance"] == 1e-5
    assert check["classes"] == 3 and check["tokens_equal"] is True
    # the tiny run resizes to 36 px before its 32 px crop, which open_clip's preprocess_cfg cannot say
    assert record["same_geometry_as_pand"] is False and "resize to 36 px" in record["preprocess_note"]
    assert json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"] == record["preprocess_cfg"]


def test_a_timm_student_with_other_class_names_and_the_run_preprocessing(data, tmp_path):
    ckpt = _train(data, tmp_path / "run", "student=timm", "student.name=resnet10t", "method.head=linear",
                  "data.resize_size=32")
    names = ["heron", "gull"]
    meta = export_student(ckpt, "open_clip", tmp_path / "oc", class_names=names)["student"]
    loaded = load_student(ckpt, names)
    teacher = load_teacher(loaded.config, device="cpu")
    x = _images()
    _, _, _, theirs = _open_clip_similarities(tmp_path / "oc", x, names, loaded.config["data"]["templates"])
    assert theirs.shape == (5, 2)
    assert (theirs - _pand_similarities(loaded, teacher, x, names)).abs().max().item() <= 1e-5
    assert meta["class_names"] == names and meta["open_clip"]["image_tower"]["from"] == "timm resnet10t"
    # resize_size = image_size: open_clip's transform is pand's up to PIL's rounding of a resampled pixel
    assert meta["open_clip"]["same_geometry_as_pand"] is True
    assert meta["open_clip"]["check"]["preprocess_max_diff_8bit_levels"] <= 1.0 + 1e-3


def test_a_failed_check_writes_nothing(resnet18_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("pand.export_open_clip.SIMILARITY_ATOL", -1.0)
    with pytest.raises(PandError, match=r"open_clip's similarities of the exported model differ from pand's by up "
                                        r"to .* nothing was written"):
        export_student(resnet18_ckpt, "open_clip", tmp_path / "oc")
    assert not (tmp_path / "oc").exists() and list(tmp_path.iterdir()) == []  # no staging folder left either


@pytest.mark.parametrize("extra,message", [
    (("method.head=conv",), "method.head=conv applies a ReLU at every position of the last feature map before "
                            "pooling, and open_clip's timm image tower only pools and then projects with a Linear or "
                            "a GELU MLP; train the student with method.head=linear (and method.fusion=none)"),
    (("method.head=linear", "method.fusion=film"), "its method.fusion=film conditions the image embedding on each "
                                                   "class text, which a CLIP model's encode_image cannot do"),
    (("method.head=linear",), "'resnet8' is one of pand's CIFAR networks (3x3 stem, no max-pool), which neither timm "
                              "nor torchvision has, so open_clip cannot build it; train a timm or torchvision student"),
])
def test_students_open_clip_cannot_express_are_refused_before_the_teacher_loads(data, tmp_path, monkeypatch, capsys,
                                                                                extra, message):
    ckpt = _train(data, tmp_path / "run", *SMALL, *extra)
    monkeypatch.setattr("pand.export_open_clip.load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    capsys.readouterr()
    assert main(["export", f"ckpt_path={ckpt}", "format=open_clip", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand export: error: format=open_clip cannot express this student: ")
    assert message in err and err.rstrip().endswith("nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def _open_vocab(name, source="auto", kwargs=None, head="linear", side=32):
    student = build_student(name, 3, source=source, pretrained=False, image_size=side, kwargs=kwargs)
    return OpenVocabStudent(student, 16, head=head, vocabulary=torch.randn(3, 16), input_size=(3, side, side))


def _config(name, source, kwargs=None, side=32):
    return {"student": {"name": name, "source": source, "kwargs": kwargs or {}},
            "data": {"image_size": side, "resize_size": side}}


@pytest.mark.parametrize("name,source,kwargs,head,message", [
    ("resnet18", "torchvision", None, "mlp", "method.head=mlp applies a ReLU between its two layers (open_clip's "
                                             "timm_proj=mlp has a GELU)"),
    ("mobilenet_v2", "torchvision", None, "linear", "timm has no model with the state-dict keys and computation of "
                                                    "torchvision 'mobilenet_v2'"),
    ("resnet18", "torchvision", {"zero_init_residual": True}, "linear",
     "torchvision student.kwargs {'zero_init_residual': True} have no counterpart in open_clip's timm config"),
    ("resnet10t", "timm", {"drop_rate": 0.2}, "linear",
     "student.kwargs drop_rate cannot be passed through open_clip's timm config, which hands timm.create_model only "
     "drop_path_rate, patch_drop_rate, global_pool"),
    ("vit_tiny_patch16_224", "timm", None, "linear",
     "open_clip builds timm 'vit_tiny_patch16_224' for its default input size 224 x 224 (its vision_cfg passes no "
     "img_size to timm), but the student was built for 32 x 32 px"),
    ("mobilenetv3_small_050", "timm", None, "linear",
     "open_clip sizes its projection by timm's num_features (288) of 'mobilenetv3_small_050', whose pooled feature "
     "has 1024"),
    ("pand_vit_p4_32", "timm", None, "linear", "'pand_vit_p4_32' is registered in timm by pand itself"),
])
def test_heads_and_backbones_open_clip_cannot_build_are_refused_with_the_reason(name, source, kwargs, head, message):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="format=open_clip cannot express this student") as caught:
        vision_tower(_open_vocab(name, source, kwargs, head=head), _config(name, source, kwargs))
    assert message in str(caught.value)


def test_a_closed_set_student_is_refused():
    student = build_student("resnet18", 3, pretrained=False, image_size=32)
    with pytest.raises(ConfigError, match=r"it is a closed-set classifier, .* only open-vocabulary students "
                                          r"\(method=openvocab\) export as open_clip models"):
        vision_tower(student, _config("resnet18", "torchvision"))


def test_timm_options_open_clip_passes_on_go_into_its_vision_cfg():
    model = _open_vocab("resnet10t", "timm", {"drop_path_rate": 0.1})
    cfg, state, origin = vision_tower(model, _config("resnet10t", "timm", {"drop_path_rate": 0.1}))
    assert cfg["timm_drop_path"] == 0.1 and cfg["timm_proj"] == "linear" and cfg["timm_proj_bias"] is True
    assert set(state) == {f"visual.trunk.{k}" for k in model.backbone.state_dict()} | {
        "visual.head.proj.weight", "visual.head.proj.bias"}


def test_linear_head_projects_the_pooled_last_feature_map():
    torch.manual_seed(0)
    vocab = F.normalize(torch.randn(3, 16), dim=-1)
    student = build_student("resnet18", 3, pretrained=False, image_size=32)
    model = OpenVocabStudent(student, 16, head="linear", dropout=0.3, vocabulary=vocab, logit_scale=20.0,
                             input_size=(3, 32, 32)).eval()
    assert set(model.state_dict()) == {*(f"backbone.{k}" for k in student.backbone.state_dict()), "head.proj.weight",
                                       "head.proj.bias", "logit_scale", "vocabulary"}
    with torch.no_grad():
        model.head.proj.bias.normal_()  # a zero bias would not show it is used
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), StageTap(model.backbone, ["layer4"]) as tap:
        model.backbone(x)
        (last,) = tap.take()
        pooled = last.mean(dim=(2, 3))  # global average pooling of the last feature map
        weight, bias = model.head.proj.weight, model.head.proj.bias
        by_hand = torch.stack([weight @ pooled[i] + bias for i in range(len(x))])
        by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(model.embed(x), by_hand, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), 20.0 * by_hand @ vocab.t(), atol=1e-5, rtol=1e-5)
    model.train()  # the dropout acts on the pooled feature while training
    assert not torch.allclose(model.embed(x), by_hand, atol=1e-3)
