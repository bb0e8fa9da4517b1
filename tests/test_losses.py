import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pand.losses import (
    dkd_loss,
    dkd_terms,
    kd_loss,
    logit_standardize,
    ofa_loss,
    vl2lite_linguistic_loss,
    vl2lite_visual_loss,
    vl2lite_weights,
)


def test_kd_loss_hand_computed_two_classes():
    # p_t = [0.75, 0.25], p_s = [0.5, 0.5]: KL = 0.75 ln 1.5 + 0.25 ln 0.5
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_loss_matches_kldivloss_batchmean_times_t2():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    T = 3.0
    ref = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-6)


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(4, 7)
    assert kd_loss(x, x, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(x, x.flip(-1), 2.0).item() > 0


def test_visual_loss_hand_computed():
    # norm([3, 4]) = [0.6, 0.8]; |0.6 - 1| + |0.8 - 0| = 1.2 over 2 entries
    h = torch.tensor([[3.0, 4.0]])
    a = torch.tensor([[1.0, 0.0]])
    assert vl2lite_visual_loss(h, a).item() == pytest.approx(0.6, abs=1e-6)


def test_linguistic_loss_default_scale_equals_authors_elementwise_mean_form():
    # The authors: KLDivLoss(reduction="mean") (sum / (B*C)) * T^2 * C / 2 == (T^2 / 2) * KL batch mean.
    g = torch.Generator().manual_seed(1)
    B, C, T = 8, 10, 2.0
    s, t = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    authors = torch.nn.KLDivLoss(reduction="mean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T * T * C / 2
    assert vl2lite_linguistic_loss(s, t, T).item() == pytest.approx(authors.item(), rel=1e-5)
    assert vl2lite_linguistic_loss(s, t, T, scale=1.0).item() == pytest.approx(2 * authors.item(), rel=1e-5)


@pytest.mark.parametrize(
    "schedule, epoch, max_epochs, w_cls",
    [
        ("code", 0, 300, 0.0),
        ("code", 150, 300, 150 / 2400),
        ("code", 300, 300, 0.125),
        ("paper", 0, 300, 0.0),
        ("paper", 15, 240, 0.5),
        ("paper", 30, 240, 1.0),
        ("paper", 200, 240, 1.0),
    ],
)
def test_vl2lite_weights(schedule, epoch, max_epochs, w_cls):
    got_cls, got_kd = vl2lite_weights(epoch, max_epochs, schedule)
    assert got_cls == pytest.approx(w_cls)
    assert got_kd == pytest.approx(1 - w_cls)


def test_vl2lite_weights_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="unknown VL2Lite weight schedule"):
        vl2lite_weights(1, 10, "linear")


# -- the heterogeneous-distillation zoo's logit losses -------------------------------------------------------------
def _kl_rows(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_logit_standardize_is_the_bessel_corrected_z_score():
    z = torch.tensor([[1.0, 2.0, 4.0, -1.0], [0.5, 0.5, 3.0, 0.0]])
    x = z.numpy().astype(np.float64)
    ref = (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)
    assert np.allclose(logit_standardize(z).numpy(), ref, atol=1e-6)
    shifted = logit_standardize(3.0 * z + 7.0)  # invariant to each sample's shift and scale
    assert torch.allclose(shifted, logit_standardize(z), atol=1e-5)


def test_dkd_splits_classical_kd_exactly():
    torch.manual_seed(0)
    s, t = torch.randn(6, 7) * 3, torch.randn(6, 7) * 3
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    temp = 2.5
    tckd, nckd = dkd_terms(s, t, y, temp)
    p_target = torch.softmax(t / temp, -1).gather(1, y[:, None]).squeeze(1)
    per_sample_kd = torch.stack([kd_loss(s[i : i + 1], t[i : i + 1], temp) for i in range(6)])
    assert torch.allclose(tckd + (1 - p_target) * nckd, per_sample_kd, atol=1e-5)


def test_dkd_terms_against_numpy():
    s = np.array([[2.0, 0.5, -1.0, 0.0]])
    t = np.array([[1.0, 1.5, -0.5, 0.2]])
    temp, y = 2.0, 1
    ps, pt = _softmax(s / temp), _softmax(t / temp)
    bs = np.array([[ps[0, y], 1 - ps[0, y]]])
    bt = np.array([[pt[0, y], 1 - pt[0, y]]])
    others = [c for c in range(4) if c != y]
    ns, nt = _softmax(s[:, others] / temp), _softmax(t[:, others] / temp)
    tckd, nckd = dkd_terms(torch.tensor(s).float(), torch.tensor(t).float(), torch.tensor([y]), temp)
    assert tckd.item() == pytest.approx(_kl_rows(bt, bs)[0] * temp**2, rel=1e-5)
    assert nckd.item() == pytest.approx(_kl_rows(nt, ns)[0] * temp**2, rel=1e-5)
    loss = dkd_loss(torch.tensor(s).float(), torch.tensor(t).float(), torch.tensor([y]), alpha=0.5, beta=8.0,
                    temperature=temp)
    assert loss.item() == pytest.approx(0.5 * tckd.item() + 8.0 * nckd.item(), rel=1e-6)


def test_dkd_gradients_are_finite_even_for_confident_logits():
    s = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[40.0, -10.0, 0.0], [1.0, 2.0, 3.0]])
    dkd_loss(s, t, torch.tensor([0, 2])).backward()
    assert torch.isfinite(s.grad).all()


def test_ofa_loss_against_numpy_and_its_eps_1_case():
    s = np.array([[1.0, 0.0, -1.0], [0.3, 0.2, 0.1]])
    t = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = np.array([0, 2])
    onehot = np.eye(3)[y]
    pt, ps = _softmax(t), _softmax(s)
    for eps in (1.0, 1.5):
        ref = (-(((pt + onehot) ** eps - onehot) * np.log(ps)).sum(-1)).mean()
        got = ofa_loss(torch.tensor(s).float(), torch.tensor(t).float(), torch.tensor(y), eps=eps)
        assert got.item() == pytest.approx(ref, rel=1e-5)
    soft_ce = (-(pt * np.log(ps)).sum(-1)).mean()  # eps = 1: cross-entropy against the teacher's soft labels
    got = ofa_loss(torch.tensor(s).float(), torch.tensor(t).float(), torch.tensor(y))
    assert got.item() == pytest.approx(soft_ce, rel=1e-5)
