import math

import pytest
import torch
import torch.nn.functional as F

from pand.losses import kd_loss, vl2lite_linguistic_loss, vl2lite_visual_loss, vl2lite_weights


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
