"""Every zoo method takes one CPU training step over CNN->CNN, CNN->ViT, ViT->CNN and MLP->CNN pairs (teacher ->
student) of tiny timm models at 32 px: finite losses, a gradient for every trainable parameter (PAT's prompts inside
the teacher included), none for the teacher's own weights."""

import pytest
import timm
import torch

from pand.distillers import Progress, TeacherContext, build_distiller, get_distiller_class
from pand.engine.teacher_side import add_stages
from pand.students import build_student
from pand.teachers import LOGITS, LiveTeacherSource
from pand.teachers.classifier import ClassifierTeacher

C = 5
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _teacher(family: str) -> ClassifierTeacher:
    torch.manual_seed(0)
    if family == "cnn":
        model, size = timm.create_model("test_resnet", num_classes=C), None
    elif family == "vit":
        model, size = timm.create_model("test_vit", num_classes=C), 160  # batches are resized to its input
    else:  # a tiny MLP-Mixer at 32 px
        from timm.models.mlp_mixer import MlpMixer

        model, size = MlpMixer(num_classes=C, img_size=32, patch_size=8, num_blocks=2, embed_dim=64), None
    return ClassifierTeacher(model, num_classes=C, image_size=size, mean=MEAN, std=STD,
                             identity={"kind": "classifier", "model": family})


METHODS = [
    {"name": "kd"},
    {"name": "kd", "standardize": True, "temperature": 2.0, "kd_weight": 9.0},
    {"name": "dkd", "warmup_epochs": 2},
    {"name": "dkd", "standardize": True},
    {"name": "ofa", "eps": 1.5},
    {"name": "nrkd"},
    {"name": "nrkd", "feature_weight": 0.0},
    {"name": "pat", "embed_dim": 32, "num_heads": 4},  # the default 512-wide attention is needlessly slow here
]

# (teacher family, student family)
PAIRS = [("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("mlp", "cnn")]


def _student(family: str):
    torch.manual_seed(1)
    if family == "cnn":
        return build_student("test_resnet", C, source="timm", pretrained=False, image_size=32)
    # a two-block ViT built for 32 px with 4-px patches
    return build_student("vit_tiny_patch16_224", C, source="timm", pretrained=False, image_size=32,
                         kwargs={"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2})


@pytest.mark.parametrize(("family", "student_family"), PAIRS, ids=lambda p: p if isinstance(p, str) else None)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_one_training_step(family, student_family, method):
    teacher = _teacher(family)
    source = LiveTeacherSource(teacher, MEAN, STD)
    student = _student(student_family)
    context = TeacherContext(identity=teacher.identity, num_classes=C)
    add_stages(context, source, 32, with_model=get_distiller_class(method["name"]).needs_teacher_model)
    distiller = build_distiller(method, student, C, context)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 4])}
    out = distiller.training_losses(batch, source(batch, distiller.requires), Progress(1, 10))
    loss = sum(out.losses.values())
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    loss.backward()
    trainable = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable), [
        n for n, p in trainable if p.grad is None]
    assert all(p.grad is None for p in teacher.parameters())


def test_logits_come_from_the_teacher_the_source_wraps():
    teacher = _teacher("cnn")
    x = torch.randn(2, 3, 32, 32)
    out = LiveTeacherSource(teacher, MEAN, STD)({"image": x}, {LOGITS})[LOGITS]
    assert torch.allclose(out, teacher.model(x), atol=1e-6)
