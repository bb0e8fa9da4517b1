"""Every method of the zoo with the students of the VL2Lite and PAND papers and other torchvision / timm CNNs, no
stage named: MobileNetV2 trains with each method through the real engine; the stage methods (OFA, NRKD, PAT and the
open-vocabulary conv head) take a training step with MobileNetV3, EfficientNet-B0, ConvNeXt-T, RegNet and a
CSP-Darknet; stages named in ``method.stages`` are the ones used."""

import copy
import csv
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import pand.distillers.ofa
from pand.cli import main
from pand.distillers import Progress, TeacherContext, build_distiller
from pand.engine.teacher_side import add_stages
from pand.errors import ConfigError
from pand.networks.stages import default_stages
from pand.stage1.store import save_text_features
from pand.students import build_student
from pand.teachers import LOGITS, STAGE_FEATURES, LiveTeacherSource
from pand.teachers.classifier import ClassifierTeacher
from tests.engine.conftest import tiny_overrides

CUB_CLASSES = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]  # make_cub's first three
C, D, SIDE = 3, 16, 32  # 32 px: Fashion-MNIST's image size, the smallest every listed student runs at
MEAN, STD = (0.5,) * 3, (0.25,) * 3

# (method overrides, a loss term only that method logs): the zoo, each with MobileNetV2 through the real engine.
ZOO = [
    (["method=ce"], "train/ce"),
    (["method=kd"], "train/kd"),
    (["method=dkd"], "train/tckd"),
    (["method=kd", "method.standardize=true"], "train/kd"),
    (["method=ofa"], "train/ofa_stages"),
    (["method=ofa", "method.stages=[backbone.features.6,backbone.features.13]"], "train/ofa_stages"),
    (["method=nrkd"], "train/nrkd_feat"),
    (["method=pat", "method.embed_dim=32", "method.num_heads=4"], "train/pat_mse"),
    (["method=vl2lite"], "train/visual_kd"),
    (["method=pand"], "train/nlrd"),  # CoOp features from a stand-in stage-1 file
    (["method=openvocab", "method.head=conv"], "train/distill"),
]


@pytest.mark.parametrize(("method", "term"), ZOO, ids=[" ".join(m)[len("method="):] for m, _ in ZOO])
def test_every_method_trains_mobilenet_v2_with_no_stage_named(cub_root, tmp_path, tiny_teacher, method, term):
    extra = []
    if method == ["method=pand"]:
        learned = tmp_path / "learned.safetensors"
        text = F.normalize(torch.randn(C, tiny_teacher.embed_dim), dim=-1)
        save_text_features(learned, text, {"teacher": tiny_teacher.identity, "classes": CUB_CLASSES})
        extra = [f"teacher.text_features={learned}"]
    run = tmp_path / "run"
    overrides = tiny_overrides(cub_root, run, "student=mobilenet_v2", "trainer.max_epochs=1", "test=false",
                               "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", *method, *extra)
    assert main(["train", *overrides]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    values = [float(r[term]) for r in rows if r.get(term)]
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))  # one per training step


# -- the stage methods with the other students, one training step each ----------------------------------------------
STUDENTS = [
    ("mobilenet_v3_small", "torchvision"),
    ("efficientnet_b0", "torchvision"),
    ("convnext_tiny", "torchvision"),
    ("regnety_002", "timm"),
    ("cs3darknet_focus_s", "timm"),
]
STAGE_METHODS = [
    {"name": "ofa"},
    {"name": "nrkd"},
    {"name": "pat", "embed_dim": 32, "num_heads": 4},
    {"name": "openvocab", "head": "conv", "dropout": 0.0},
]


@functools.cache
def _built(name: str, source: str):
    torch.manual_seed(0)
    return build_student(name, C, source=source, pretrained=False, image_size=SIDE)


def _student(name: str = "mobilenet_v2", source: str = "torchvision"):
    return copy.deepcopy(_built(name, source)).train()


@functools.cache
def _teacher() -> ClassifierTeacher:
    torch.manual_seed(0)
    return ClassifierTeacher(timm.create_model("test_resnet", num_classes=C), num_classes=C, image_size=None,
                             mean=MEAN, std=STD, identity={"kind": "classifier", "model": "test_resnet"})


def _context(method: str) -> TeacherContext:
    if method == "openvocab":
        text = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(0)), dim=-1)
        return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=text)
    context = TeacherContext(identity=_teacher().identity, num_classes=C)
    add_stages(context, LiveTeacherSource(_teacher(), MEAN, STD), SIDE, with_model=method == "pat")
    return context


def _step(distiller, batch) -> dict[str, torch.Tensor]:
    """One training step's losses (backward done) with the classifier teacher's or random CLIP outputs."""
    if distiller.name == "openvocab":
        teacher = {"image_embeds": F.normalize(torch.randn(len(batch["image"]), D), dim=-1)}
    else:
        teacher = LiveTeacherSource(_teacher(), MEAN, STD)(batch, {LOGITS, STAGE_FEATURES})
    out = distiller.training_losses(batch, teacher, Progress(0, 1))
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    sum(out.losses.values()).backward()
    return out.losses


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, SIDE, SIDE, generator=gen), "label": torch.arange(n) % C}


@pytest.mark.parametrize("options", STAGE_METHODS, ids=[m["name"] for m in STAGE_METHODS])
@pytest.mark.parametrize(("name", "source"), STUDENTS, ids=[s[0] for s in STUDENTS])
def test_the_stage_methods_train_every_listed_student_with_no_stage_named(name, source, options):
    student = _student(name, source)
    found = default_stages(student)
    distiller = build_distiller(options, student, C, _context(options["name"]))
    losses = _step(distiller, _batch())
    stem = next(m for m in student.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    if options["name"] == "ofa":
        assert distiller.stage_names == found[:-1] and "ofa_stages" in losses
    elif options["name"] == "nrkd":
        assert set(distiller.stage_names) <= set(found[:-1]) and "nrkd_feat" in losses  # the 1 x 1 map is left out
    elif options["name"] == "pat":
        assert distiller.stage_names == found[-len(distiller.stage_names):] and "pat_mse" in losses
    else:
        assert "backbone." + distiller.student.stage == found[-1]  # the head projects the map the student pools


# -- stages named in method.stages ----------------------------------------------------------------------------------
NAMED = ["backbone.features.3", "backbone.features.6", "backbone.features.13"]


def test_ofa_uses_the_named_stages_even_where_the_finder_cannot_tell(monkeypatch):
    ofa = build_distiller({"name": "ofa", "stages": NAMED}, _student(), C, None)
    assert ofa.stage_names == NAMED
    # every branch brings its stage down to the 1 x 1 map the student pools at 32 px: 8, 4 and 2 px sides
    assert [len(b.blocks) for b in ofa.branches] == [3, 2, 1]

    def cannot_tell(*args, **kwargs):
        raise ConfigError("cannot tell the stages")

    monkeypatch.setattr(pand.distillers.ofa, "default_stages", cannot_tell)
    ofa = build_distiller({"name": "ofa", "stages": NAMED}, _student(), C, None)
    assert ofa.stage_names == NAMED and [len(b.blocks) for b in ofa.branches] == [2, 1, 0]  # to the 2 x 2 map
    assert set(_step(ofa, _batch())) == {"ce", "ofa", "ofa_stages"}
    with pytest.raises(ConfigError, match="cannot tell"):
        build_distiller({"name": "ofa"}, _student(), C, None)


def test_nrkd_pat_and_the_conv_head_use_the_named_stages():
    nrkd = build_distiller({"name": "nrkd", "stages": NAMED}, _student(), C, _context("nrkd"))
    assert nrkd.stage_names == NAMED  # the deepest three, paired with the teacher's deepest three
    pat = build_distiller({"name": "pat", "embed_dim": 32, "num_heads": 4, "stages": NAMED[1:]}, _student(), C,
                          _context("pat"))
    assert pat.stage_names == NAMED[1:]
    head = build_distiller({"name": "openvocab", "stages": NAMED[-1:]}, _student(), C, _context("openvocab"))
    assert head.student.stage == "features.13" and head.student.head[0].in_channels == 96
    assert head.student.visual_tokens(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 4, 96)  # its 2 x 2 map


@pytest.mark.parametrize("options", [{"name": "ofa"}, {"name": "nrkd"}, {"name": "openvocab"}],
                         ids=["ofa", "nrkd", "openvocab"])
def test_unknown_named_stages_are_refused_with_the_paths_near_them(options):
    with pytest.raises(ConfigError, match=r"method.stages: Student has no submodule 'features.13' \(near "
                                          r"'features.13': .*backbone.features.13"):
        build_distiller({**options, "stages": ["features.13"]}, _student(), C, _context(options["name"]))


def test_the_heads_on_the_pooled_feature_refuse_named_stages():
    with pytest.raises(ConfigError, match="method.head=mlp reads the pooled feature"):
        build_distiller({"name": "openvocab", "head": "mlp", "stages": NAMED}, _student(), C, _context("openvocab"))
    with pytest.raises(ConfigError, match="a path starting with 'backbone.'.*backbone.features.18"):
        build_distiller({"name": "openvocab", "stages": ["linear_cls"]}, _student(), C, _context("openvocab"))
