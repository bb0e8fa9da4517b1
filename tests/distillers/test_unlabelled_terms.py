"""Unlabelled samples in a batch (label -1, ``labelled`` mask False): every distiller applies its label terms to the
labelled samples only and its teacher terms to all; cross-entropy's gradient is unchanged by adding unlabelled
samples; terms built around a target class use the teacher's top-1 class where there is no label."""

import pytest
import torch
import torch.nn.functional as F

from pand.distillers import Distiller, Progress, TeacherContext, build_distiller, list_distillers
from pand.engine.teacher_side import add_stages
from pand.students import build_student
from pand.teachers import LiveTeacherSource
from tests.distillers.test_logit_methods import MEAN, STD, _student, _teacher

C, D = 5, 16
# per method: extra options (small heads where the defaults are needlessly slow on a CPU)
OPTIONS = {"pat": {"embed_dim": 32, "num_heads": 4}}
CLIP_METHODS = {"vl2lite", "pand", "openvocab"}


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _batch(unlabelled_labels):
    """4 labelled samples then 3 unlabelled ones whose label field holds ``unlabelled_labels``."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 1, 2, 4, *unlabelled_labels])
    return {"image": torch.randn(7, 3, 32, 32, generator=g), "label": labels,
            "labelled": torch.tensor([True] * 4 + [False] * 3), "index": torch.arange(7)}


def _distiller_and_teacher(name):
    """The distiller and a function giving the teacher's outputs for a batch (a CLIP-like teacher for the methods
    that read image embeddings, a tiny classifier teacher for the logit-based zoo)."""
    opts = {"name": name, **OPTIONS.get(name, {})}
    if name in CLIP_METHODS:
        text = _unit(C, D, seed=0)
        context = TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=text, prompt_embeds=_unit(C, D, seed=1))
        torch.manual_seed(0)
        student = build_student("resnet18", C, pretrained=False, image_size=32)
        embeds = _unit(7, D, seed=2)

        def outputs(batch, keys):
            return {"image_embeds": embeds, "logits": context.logit_scale * embeds @ text.t()}
        return build_distiller(opts, student, C, context), outputs
    teacher = _teacher("cnn")
    source = LiveTeacherSource(teacher, MEAN, STD)
    context = TeacherContext(identity=teacher.identity, num_classes=C)
    cls_needs_model = name == "pat"
    add_stages(context, source, 32, with_model=cls_needs_model)
    return build_distiller(opts, _student("cnn"), C, context), lambda batch, keys: source(batch, keys)


@pytest.mark.parametrize("name", sorted(list_distillers()))
def test_no_distiller_reads_the_label_of_an_unlabelled_sample(name):
    distiller, outputs = _distiller_and_teacher(name)
    results = []
    for fake in ([-1, -1, -1], [3, 0, 1]):  # what an unlabelled sample's label field holds must not matter
        batch = _batch(fake)
        torch.manual_seed(0)
        out = distiller.training_losses(batch, outputs(batch, distiller.requires), Progress(1, 10))
        results.append(out)
        assert out.losses and all(torch.isfinite(v) for v in out.losses.values()), out.losses
    a, b = results
    assert a.losses.keys() == b.losses.keys()
    for k in a.losses:
        assert torch.allclose(a.losses[k], b.losses[k], atol=1e-6), (name, k)
    sum(a.losses.values()).backward()  # the masked terms keep a graph


@pytest.mark.parametrize("name", sorted(list_distillers()))
def test_an_all_unlabelled_batch_trains_the_teacher_terms_and_gives_zero_cross_entropy(name):
    distiller, outputs = _distiller_and_teacher(name)
    batch = _batch([-1, -1, -1])
    batch["label"][:] = -1
    batch["labelled"][:] = False
    out = distiller.training_losses(batch, outputs(batch, distiller.requires), Progress(1, 10))
    for term in distiller.label_terms & set(out.losses):
        assert out.losses[term].item() == 0.0, term
    teacher_terms = {k: v for k, v in out.losses.items() if k not in distiller.label_terms}
    if name != "ce":
        assert teacher_terms and any(v.item() != 0 for v in teacher_terms.values()), out.losses


def test_cross_entropy_gradient_is_unchanged_by_adding_unlabelled_samples():
    torch.manual_seed(0)
    student = build_student("resnet18", C, pretrained=False, image_size=32).eval()  # BN: running statistics
    batch = _batch([-1, -1, -1])
    labelled = {k: v[:4] for k, v in batch.items()}

    def grads(b):
        student.zero_grad()
        Distiller.cross_entropy(student(b["image"]), b).backward()
        return [p.grad.clone() for p in student.parameters()]

    for g_all, g_labelled in zip(grads(batch), grads(labelled)):
        torch.testing.assert_close(g_all, g_labelled, atol=1e-6, rtol=1e-5)
    logits = torch.randn(7, C)
    assert Distiller.cross_entropy(logits, batch).item() == pytest.approx(
        F.cross_entropy(logits[:4], batch["label"][:4]).item(), rel=1e-6)
    # without a mask, label -1 marks an unlabelled sample all the same
    no_mask = {k: v for k, v in batch.items() if k != "labelled"}
    assert Distiller.cross_entropy(logits, no_mask).item() == pytest.approx(
        F.cross_entropy(logits[:4], batch["label"][:4]).item(), rel=1e-6)


def test_target_classes_are_labels_where_known_and_the_teachers_top1_elsewhere():
    batch = _batch([-1, -1, -1])
    teacher_logits = torch.zeros(7, C)
    teacher_logits[torch.arange(7), torch.tensor([4, 4, 4, 4, 3, 0, 2])] = 5.0
    assert Distiller.target_classes(batch, teacher_logits).tolist() == [0, 1, 2, 4, 3, 0, 2]


def test_vl2lite_trains_its_head_on_unlabelled_samples_from_the_teachers_distribution():
    distiller, outputs = _distiller_and_teacher("vl2lite")
    batch = _batch([-1, -1, -1])
    teacher = outputs(batch, distiller.requires)
    out = distiller.training_losses(batch, teacher, Progress(4, 10))
    w_cls = 4 / (8 * 10)  # the authors' code schedule
    p_t = F.softmax(teacher["logits"][4:], -1)
    expected = -(p_t * F.log_softmax(out.logits[4:].float(), -1)).sum(-1).mean()
    assert out.losses["teacher_ce"].item() == pytest.approx(w_cls * expected.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(w_cls * F.cross_entropy(out.logits[:4], batch["label"][:4]).item(),
                                                    rel=1e-5)
    out.losses["teacher_ce"].backward()
    assert distiller.student.linear_cls.weight.grad.abs().sum() > 0  # the term reaches the head
    labelled = {k: v[:4] for k, v in batch.items()}
    assert "teacher_ce" not in distiller.training_losses(labelled, {k: v[:4] for k, v in teacher.items()},
                                                         Progress(4, 10)).losses
