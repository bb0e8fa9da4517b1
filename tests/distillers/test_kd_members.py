"""KD with a teacher ensemble: ``method.members=mean`` matches the ensemble's averaged distribution (its ``logits``),
``method.members=each`` every member's own (``member_logits``), weighted by the member weights."""

import math

import pytest
import torch

from pand.distillers import Progress, TeacherContext, build_distiller, get_distiller_class
from pand.rules import check_rules
from pand.students import build_student
from pand.teachers import LOGITS, MEMBER_LOGITS
from pand.teachers.ensemble import average_log_probs

C = 3
STUDENT = [1.0, 0.0, -1.0]
MEMBERS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kd(student, teacher_probs, t):
    """``T^2 KL(p_t || softmax(z_s / T))`` by hand."""
    p_s = _softmax(student, t)
    return t * t * sum(p * math.log(p / q) for p, q in zip(teacher_probs, p_s))


def _distiller(members: str, weights=None, **options):
    torch.manual_seed(0)
    student = build_student("test_resnet", C, source="timm", pretrained=False, image_size=32)
    return build_distiller({"name": "kd", "members": members, **options}, student, C,
                           TeacherContext(num_classes=C, member_weights=weights))


def _teacher_outputs():
    member_logits = torch.tensor([MEMBERS])  # [B=1, M=2, C=3]
    return {LOGITS: average_log_probs(member_logits), MEMBER_LOGITS: member_logits}


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_each_is_the_weighted_mean_of_the_members_kd_terms(t):
    d = _distiller("each", [0.75, 0.25], temperature=t)
    got = d.kd_term(torch.tensor([STUDENT]), _teacher_outputs())
    expected = 0.75 * _kd(STUDENT, _softmax(MEMBERS[0], t), t) + 0.25 * _kd(STUDENT, _softmax(MEMBERS[1], t), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # equal weights when the teacher gives none
    equal = _distiller("each", None, temperature=t).kd_term(torch.tensor([STUDENT]), _teacher_outputs())
    expected = (_kd(STUDENT, _softmax(MEMBERS[0], t), t) + _kd(STUDENT, _softmax(MEMBERS[1], t), t)) / 2
    assert equal.item() == pytest.approx(expected, rel=1e-5)


def test_mean_matches_the_averaged_distribution():
    d = _distiller("mean", temperature=1.0)
    got = d.kd_term(torch.tensor([STUDENT]), _teacher_outputs())
    mean = [(a + b) / 2 for a, b in zip(_softmax(MEMBERS[0], 1.0), _softmax(MEMBERS[1], 1.0))]
    assert got.item() == pytest.approx(_kd(STUDENT, mean, 1.0), rel=1e-5)
    # KL is convex: matching the mean costs less than the mean of matching each
    each = _distiller("each", temperature=1.0).kd_term(torch.tensor([STUDENT]), _teacher_outputs())
    assert got.item() < each.item()


def test_members_each_reads_only_the_member_logits():
    kd = get_distiller_class("kd")
    assert kd.requires_for({}) == {LOGITS} and kd.requires_for({"members": "mean"}) == {LOGITS}
    assert kd.requires_for({"members": "each"}) == {MEMBER_LOGITS}
    d = _distiller("each")
    assert d.requires == {MEMBER_LOGITS} and _distiller("mean").requires == {LOGITS}
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 1])}
    out = d.training_losses(batch, {MEMBER_LOGITS: torch.randn(2, 2, C)}, Progress(0, 1))
    assert set(out.losses) == {"ce", "kd"} and torch.isfinite(out.losses["kd"])


def test_members_option_is_checked():
    (error,) = check_rules({"members": "all"}, get_distiller_class("kd").option_rules, prefix="method.")
    assert "method.members='all' is not allowed: expected one of 'mean', 'each'" in error
