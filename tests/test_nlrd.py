"""NLRD against an independent loop-by-loop implementation and its defining properties."""

import math

import numpy as np
import pytest
import torch

from pand.losses import nlrd_loss


def reference_nlrd(s, t, k):
    """Written from the formula with explicit loops in numpy (no shared code with pand.losses)."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    B = s.shape[0]
    k = min(k, B - 1)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    total = 0.0
    for i in range(B):
        sims = [(tn[i] @ tn[j], j) for j in range(B) if j != i]
        sims.sort(key=lambda x: -x[0])
        for _, j in sims[:k]:
            ds, dt = s[i] - s[j], t[i] - t[j]
            q = np.exp(ds - ds.max()) / np.exp(ds - ds.max()).sum()
            p = np.exp(dt - dt.max()) / np.exp(dt - dt.max()).sum()
            m = (p + q) / 2
            total += 0.5 * (np.sum(q * np.log(q / m)) + np.sum(p * np.log(p / m)))
    return total / (B * k)


# A 4 x 3 example small enough to follow by hand: samples 0/1 and 2/3 are teacher neighbours (k = 1).
S = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]
T = [[3.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]]


def test_hand_computed_4x3_example():
    # k = 1: pairs (0,1), (1,0), (2,3), (3,2). For (0,1): d_s = [2,-1,0], d_t = [1,0,0].
    got = nlrd_loss(torch.tensor(S), torch.tensor(T), k=1).item()
    ref = reference_nlrd(S, T, 1)
    assert got == pytest.approx(ref, rel=1e-5)
    # the first pair written out: q = softmax([2,-1,0]), p = softmax([1,0,0])
    q = np.exp([2, -1, 0]) / np.exp([2, -1, 0]).sum()
    p = np.exp([1, 0, 0]) / np.exp([1, 0, 0]).sum()
    m = (p + q) / 2
    js01 = 0.5 * (np.sum(q * np.log(q / m)) + np.sum(p * np.log(p / m)))
    assert js01 == pytest.approx(0.051186, abs=1e-6)
    assert got == pytest.approx(0.051487, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_reference_on_random_batches(k):
    g = torch.Generator().manual_seed(k)
    s, t = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    assert nlrd_loss(s, t, k).item() == pytest.approx(reference_nlrd(s, t, k), rel=1e-5)


def test_zero_when_student_equals_teacher():
    t = torch.randn(8, 6)
    assert nlrd_loss(t.clone(), t, k=3).item() == pytest.approx(0.0, abs=1e-7)


def test_invariant_to_a_per_sample_constant():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    c = torch.randn(6, 1, generator=g) * 5
    base = nlrd_loss(s, t, k=2).item()
    assert nlrd_loss(s + c, t, k=2).item() == pytest.approx(base, rel=1e-5)
    # with every other sample a neighbour, the teacher's constant cannot change the selection either
    full = nlrd_loss(s, t, k=5).item()
    assert nlrd_loss(s + c, t - 2 * c, k=5).item() == pytest.approx(full, rel=1e-5)


def test_finite_for_batch_of_two_with_k3_and_zero_for_one():
    s, t = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5)
    loss = nlrd_loss(s, t, k=3)  # k clamped to 1
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference_nlrd(s.detach(), t, 1), rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    one = torch.randn(1, 5, requires_grad=True)
    zero = nlrd_loss(one, torch.randn(1, 5), k=3)
    assert zero.item() == 0.0
    zero.backward()  # attached to the graph: a size-1 last batch does not break training


def test_gathered_pool_equals_the_concatenated_batch():
    # Two "processes" with 4 samples each: the loss of rank 1's queries against the pool equals the corresponding
    # part of the loss over the concatenated batch.
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    full = nlrd_loss(s, t, k=3)
    r0 = nlrd_loss(s[:4], t[:4], k=3, pool_student=s, pool_teacher=t, self_index=torch.arange(0, 4))
    r1 = nlrd_loss(s[4:], t[4:], k=3, pool_student=s, pool_teacher=t, self_index=torch.arange(4, 8))
    assert ((r0 + r1) / 2).item() == pytest.approx(full.item(), rel=1e-6)
