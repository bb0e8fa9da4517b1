import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pand.losses import (
    affinity_mimicking_loss,
    dkd_loss,
    dkd_terms,
    hcl_loss,
    interactive_contrastive_loss,
    kd_loss,
    logit_standardize,
    nrkd_feature_loss,
    ofa_loss,
    token_grid_side,
    tokens_to_map,
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


# -- feature losses: NRKD's neighbour term and the hierarchical context loss ---------------------------------------
def _block_mean(x, size):
    """Average pooling of a [B, C, H, W] array to size x size, H and W multiples of size (what adaptive pooling does
    for exact multiples)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def _neighbour_vector_loops(x):
    # one sample [C, H, W]: right differences row by row, then down differences row by row
    c, h, w = x.shape
    right = [np.mean([(x[k, i, j + 1] - x[k, i, j]) ** 2 for k in range(c)]) for i in range(h) for j in range(w - 1)]
    down = [np.mean([(x[k, i + 1, j] - x[k, i, j]) ** 2 for k in range(c)]) for i in range(h - 1) for j in range(w)]
    v = np.array(right + down)
    return v / np.linalg.norm(v)


def _nrkd_reference(s, t):
    vs = np.stack([_neighbour_vector_loops(x) for x in s])
    vt = np.stack([_neighbour_vector_loops(x) for x in t])
    return ((vs - vt) ** 2).mean()


def test_token_grid_side_detects_a_class_token():
    assert token_grid_side(64) == (8, 0)
    assert token_grid_side(65) == (8, 1)
    assert token_grid_side(197) == (14, 1)
    assert token_grid_side(198, prefix_tokens=2) == (14, 2)
    with pytest.raises(ValueError, match="prefix_tokens"):
        token_grid_side(70)
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2 x 2 grid, width 3
    grid = tokens_to_map(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[1, :, 1, 0], tokens[1, 3])  # patch (1, 0) is token 1 + 2 (row-major after the class)


def test_nrkd_feature_loss_hand_computed():
    # one channel, 1 x 3 row: right differences (1, 2) -> squares (1, 4) -> normalised (1, 4) / sqrt(17)
    s = torch.tensor([[[[0.0, 1.0, 3.0]]]])
    t = torch.tensor([[[[0.0, 2.0, 4.0]]]])  # squares (4, 4) -> (1, 1) / sqrt(2)
    vs, vt = np.array([1.0, 4.0]) / math.sqrt(17), np.array([1.0, 1.0]) / math.sqrt(2)
    assert nrkd_feature_loss(s, t).item() == pytest.approx(((vs - vt) ** 2).mean(), rel=1e-6)


def test_nrkd_feature_loss_against_loops_with_different_widths():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 4, 3, 5)), rng.normal(size=(3, 7, 3, 5))  # channel counts differ
    got = nrkd_feature_loss(torch.tensor(s).float(), torch.tensor(t).float())
    assert got.item() == pytest.approx(_nrkd_reference(s, t), rel=1e-5)


def test_nrkd_feature_loss_pools_the_larger_map_to_the_smaller():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 6, 8, 8))
    expected = _nrkd_reference(s, _block_mean(t, 4))
    got = nrkd_feature_loss(torch.tensor(s).float(), torch.tensor(t).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)
    swapped = nrkd_feature_loss(torch.tensor(t).float(), torch.tensor(s).float())  # same when the student is larger
    assert swapped.item() == pytest.approx(expected, rel=1e-5)


def test_nrkd_feature_loss_reads_tokens_as_their_patch_grid():
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(2, 5, 4, 4))  # [B, C, 4, 4]
    tokens = grid.reshape(2, 5, 16).transpose(0, 2, 1)  # [B, 16, C], row-major patches
    with_cls = np.concatenate([rng.normal(size=(2, 1, 5)), tokens], axis=1)  # the class token is ignored
    t = rng.normal(size=(2, 3, 4, 4))
    expected = _nrkd_reference(grid, t)
    for student in (tokens, with_cls):
        got = nrkd_feature_loss(torch.tensor(student).float(), torch.tensor(t).float())
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nrkd_feature_loss_zero_for_identical_positive_otherwise_and_finite_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    assert nrkd_feature_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-9)
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = nrkd_feature_loss(s, x)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    flat = torch.zeros(1, 2, 3, 3, requires_grad=True)  # no contrast at all: the normalisation must not divide by 0
    nrkd_feature_loss(flat, x[:1]).backward()
    assert torch.isfinite(flat.grad).all()


def test_nrkd_feature_loss_rejects_a_single_position_and_bad_ranks():
    with pytest.raises(ValueError, match="at least 2 positions"):
        nrkd_feature_loss(torch.randn(2, 3, 1, 1), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        nrkd_feature_loss(torch.randn(2, 3), torch.randn(2, 3))


def _hcl_reference(s, t, levels):
    # explicit weights per case, independent of the implementation's halving rule
    terms = [(1.0, ((s - t) ** 2).mean())]
    terms += [(w, ((_block_mean(s, k) - _block_mean(t, k)) ** 2).mean()) for k, w in levels]
    return sum(w * m for w, m in terms) / sum(w for w, _ in terms)


def test_hcl_loss_against_numpy_for_an_8x8_map():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, 8, 8))
    expected = _hcl_reference(s, t, [(4, 0.5), (2, 0.25), (1, 0.125)])  # normalised by 1.875
    assert hcl_loss(torch.tensor(s).float(), torch.tensor(t).float()).item() == pytest.approx(expected, rel=1e-5)


def test_hcl_loss_skips_levels_not_coarser_than_the_map():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    expected = _hcl_reference(s, t, [(2, 0.5), (1, 0.25)])  # 4 x 4 is the map itself: (.. ) / 1.75
    assert hcl_loss(torch.tensor(s).float(), torch.tensor(t).float()).item() == pytest.approx(expected, rel=1e-5)
    s1, t1 = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    assert hcl_loss(s1, t1).item() == pytest.approx(F.mse_loss(s1, t1).item(), rel=1e-6)


def test_hcl_loss_on_tokens_covers_the_class_token_at_full_resolution():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(2, 17, 3)), rng.normal(size=(2, 17, 3))  # class token + 4 x 4 grid

    def grid(x):  # drop the class token, patches row-major -> [B, C, 4, 4]
        return x[:, 1:].reshape(2, 4, 4, 3).transpose(0, 3, 1, 2)

    full = ((s - t) ** 2).mean()
    pooled = [((_block_mean(grid(s), k) - _block_mean(grid(t), k)) ** 2).mean() for k in (2, 1)]
    expected = (full + 0.5 * pooled[0] + 0.25 * pooled[1]) / 1.75
    assert hcl_loss(torch.tensor(s).float(), torch.tensor(t).float()).item() == pytest.approx(expected, rel=1e-5)


def test_hcl_loss_zero_for_identical_positive_otherwise_and_finite_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6)
    assert hcl_loss(x, x.clone()).item() == 0.0
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    loss = hcl_loss(s, x)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_hcl_loss_names_both_shapes_when_they_differ():
    with pytest.raises(ValueError, match=r"\(2, 4, 6, 6\).*\(2, 8, 6, 6\)"):
        hcl_loss(torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6))


# -- CLIP distillation: ICL (CLIP-KD) and affinity mimicking (TinyCLIP / CRD) --------------------------------------
def _unit_rows(x):
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def icl_by_hand(s, t, tau):
    """-mean_i log(exp(s_i . t_i / tau) / sum_j exp(s_i . t_j / tau)), with explicit loops over plain lists."""
    s, t = _unit_rows(s), _unit_rows(t)
    total = 0.0
    for i in range(len(s)):
        denominator = sum(math.exp(_dot(s[i], t[j]) / tau) for j in range(len(t)))
        total += -math.log(math.exp(_dot(s[i], t[i]) / tau) / denominator)
    return total / len(s)


def _kl_list(p, q):
    return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))


def _softmax_list(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def affinity_by_hand(s, t, w, tau):
    """Mean over images of KL over classes, mean over classes of KL over images, averaged (one direction at B = 1)."""
    s, t, w = _unit_rows(s), _unit_rows(t), _unit_rows(w)
    b, c = len(s), len(w)
    per_image = [_kl_list(_softmax_list([_dot(t[i], w[k]) / tau for k in range(c)]),
                          _softmax_list([_dot(s[i], w[k]) / tau for k in range(c)])) for i in range(b)]
    image_to_vocabulary = sum(per_image) / b
    if b == 1:
        return image_to_vocabulary
    per_class = [_kl_list(_softmax_list([_dot(w[k], t[i]) / tau for i in range(b)]),
                          _softmax_list([_dot(w[k], s[i]) / tau for i in range(b)])) for k in range(c)]
    return 0.5 * (image_to_vocabulary + sum(per_class) / c)


def test_icl_hand_computed():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # normalised: (0.6, 0.8), (1, 0)
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: (1, 0), (0, 1)
    # tau = 0.5: logits [[1.2, 1.6], [2, 0]]; positives on the diagonal
    # row 0: -log(e^1.2 / (e^1.2 + e^1.6)) = log(1 + e^0.4); row 1: -log(1 / (e^2 + 1)) = log(1 + e^2)
    expected = (math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(2.0))) / 2
    assert interactive_contrastive_loss(s, t, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_icl_matches_a_loop_over_anchors_and_candidates():
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    expected = icl_by_hand(s.tolist(), t.tolist(), 0.1)
    assert interactive_contrastive_loss(s, t, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_icl_of_a_single_sample_is_zero():
    assert interactive_contrastive_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 1.0]])).item() == 0.0


def test_affinity_hand_computed():
    w = torch.eye(2)
    t = torch.eye(2)  # teacher: image i is closest to class i
    s = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # student: the other way round
    # tau = 1: every row and every column compares softmax(1, 0) with softmax(0, 1); with a = e / (1 + e),
    # KL = a log(a / (1 - a)) + (1 - a) log((1 - a) / a) = 2a - 1 = tanh(1/2), in both directions
    assert affinity_mimicking_loss(s, t, w, 1.0).item() == pytest.approx(math.tanh(0.5), rel=1e-6)


def test_affinity_matches_loops_over_images_and_classes():
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    expected = affinity_by_hand(s.tolist(), t.tolist(), w.tolist(), 0.2)
    assert affinity_mimicking_loss(s, t, w, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_affinity_of_a_single_sample_is_the_vocabulary_direction_alone():
    # no distribution over one image: the term is the image -> vocabulary KL, not its half
    s, t, w = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.eye(2)
    assert affinity_mimicking_loss(s, t, w, 1.0).item() == pytest.approx(math.tanh(0.5), rel=1e-6)
    g = torch.Generator().manual_seed(13)
    s, t, w = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g), torch.randn(3, 6, generator=g)
    expected = affinity_by_hand(s.tolist(), t.tolist(), w.tolist(), 0.07)
    assert affinity_mimicking_loss(s, t, w, 0.07).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss", ["icl", "affinity"])
def test_relational_losses_are_lower_at_the_teacher_than_elsewhere_and_give_finite_gradients(loss):
    g = torch.Generator().manual_seed(14)
    t, w = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)

    def value(s):
        return interactive_contrastive_loss(s, t) if loss == "icl" else affinity_mimicking_loss(s, t, w)

    if loss == "affinity":
        assert value(t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 8, generator=g, requires_grad=True)
    out = value(s)
    assert out.item() > value(t.clone()).item()
    out.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_relational_losses_compute_in_float32_under_autocast():
    g = torch.Generator().manual_seed(15)
    s, t, w = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g), torch.randn(5, 32, generator=g)
    full = (interactive_contrastive_loss(s, t), affinity_mimicking_loss(s, t, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (interactive_contrastive_loss(s, t), affinity_mimicking_loss(s, t, w))
    for a, b in zip(full, mixed):
        assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=1e-6)


def test_caption_infonce_by_hand_with_two_images_sharing_a_caption():
    from pand.losses import caption_infonce_loss

    # images 0 and 2 share caption 5 (text u0 = (1, 0)), image 1 has caption 7 (u1 = (0, 1)); tau = 0.5
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # each sample's caption embedding
    ids = torch.tensor([5, 7, 5])
    # logits e . u / tau: image 0 (2, 0), image 1 (1.2, 1.6), image 2 (0, 2); targets u0, u1, u0
    image_to_text = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(2))) / 3
    # u0 ranks the images by (2, 1.2, 0) with images 0 and 2 positive; u1 by (0, 1.6, 2) with image 1 positive
    lse0, lse1 = math.log(math.exp(2) + math.exp(1.2) + 1), math.log(1 + math.exp(1.6) + math.exp(2))
    text_to_image = ((lse0 - (2 + 0) / 2) + (lse1 - 1.6)) / 2
    expected = 0.5 * (image_to_text + text_to_image)
    assert caption_infonce_loss(e, texts, ids, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # a caption shared by two images is one text, not a negative of the other: plain CLIP targets differ
    plain = 0.5 * (F.cross_entropy(e @ texts.t() / 0.5, torch.arange(3)) + F.cross_entropy(texts @ e.t() / 0.5,
                                                                                             torch.arange(3)))
    assert plain.item() != pytest.approx(expected, rel=1e-3)
    # distinct captions: exactly CLIP's symmetric loss; unnormalised inputs are normalised first
    ids = torch.tensor([1, 2, 3])
    texts = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    u = F.normalize(texts, dim=-1)
    clip = 0.5 * (F.cross_entropy(e @ u.t() / 0.5, torch.arange(3)) + F.cross_entropy(u @ e.t() / 0.5, torch.arange(3)))
    assert caption_infonce_loss(3 * e, texts, ids, 0.5).item() == pytest.approx(clip.item(), rel=1e-5)


def test_text_distill_loss_by_hand():
    from pand.losses import text_distill_loss

    # student texts s0 = (1, 0), s1 = (0.6, 0.8); teacher t0 = (0.8, 0.6), t1 = (0, 1); tau = 0.5
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    cosine = ((1 - 0.8) + (1 - 0.8)) / 2
    # s t^T / tau = [[1.6, 0], [1.92, 1.6]]: rows rank the teacher's texts, columns the student's
    student_to_teacher = (math.log(1 + math.exp(-1.6)) + math.log(1 + math.exp(0.32))) / 2
    teacher_to_student = (math.log(1 + math.exp(0.32)) + math.log(1 + math.exp(-1.6))) / 2
    contrastive = 0.5 * (student_to_teacher + teacher_to_student)
    assert text_distill_loss(s, t, 0.0, 0.5).item() == pytest.approx(cosine, abs=1e-6)
    assert text_distill_loss(s, t, 1.0, 0.5).item() == pytest.approx(cosine + contrastive, rel=1e-6)
    # the weight scales the contrastive term alone; unnormalised inputs are normalised first
    assert text_distill_loss(3 * s, 2 * t, 0.25, 0.5).item() == pytest.approx(cosine + 0.25 * contrastive, rel=1e-6)
    # one text has no negative: its InfoNCE is 0
    assert text_distill_loss(s[:1], t[:1], 1.0, 0.5).item() == pytest.approx(0.2, abs=1e-6)
