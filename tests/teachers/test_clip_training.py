"""open_clip's recipe for the CLIP parts pand fits itself: which parameters decay, and the rate at each step."""

import math

import pytest
import torch

from pand.teachers.clip_training import WARMUP_STEPS, clip_optimizer, warmup_cosine


def test_only_weight_matrices_decay():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(10, 4)
            self.positional_embedding = torch.nn.Parameter(torch.zeros(3, 4))
            self.proj = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4)
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    model = Tiny()
    opt = clip_optimizer(model, 1e-3, 0.05)
    decayed, plain = opt.param_groups
    assert [p is model.proj.weight for p in decayed["params"]] == [True] and decayed["weight_decay"] == 0.05
    assert len(plain["params"]) == 6 and plain["weight_decay"] == 0.0  # 2 embeddings, bias, 2 norm gains, scale
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6 and opt.defaults["lr"] == 1e-3


@pytest.mark.parametrize(("total", "warmup"), [(50, 5), (5000, WARMUP_STEPS), (3, 1)])
def test_a_linear_warm_up_then_a_cosine_down_to_zero(total, warmup):
    rates = [warmup_cosine(s, lr=2.0, total=total) for s in range(total + 1)]
    assert rates[:warmup] == pytest.approx([2.0 * (s + 1) / warmup for s in range(warmup)])
    assert rates[warmup] == pytest.approx(2.0)  # the top of the cosine
    middle = warmup + (total - warmup) // 2
    assert rates[middle] == pytest.approx(1.0 + math.cos(math.pi * (middle - warmup) / (total - warmup)))
    assert rates[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
