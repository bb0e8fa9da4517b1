"""open_clip's training recipe, for the CLIP-architecture parts pand fits itself (the stand-in teacher of
``pand teacher fit``, a distilled text tower of ``pand teacher text-tower``): AdamW with CLIP's betas and epsilon, no
weight decay on gains, biases, scales and embeddings, and a linear warm-up into a cosine decay, stepped by hand."""

from __future__ import annotations

import math

import torch

#: The longest warm-up, in steps (a tenth of a shorter fit).
WARMUP_STEPS = 100


def clip_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.98, eps 1e-6) over every parameter of ``model``, with ``weight_decay`` on the weight
    matrices only: parameters of fewer than two dimensions (gains, biases, the logit scale) and embeddings are not
    decayed."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim < 2 or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(step: int, *, lr: float, total: int) -> float:
    """The rate of 0-based ``step`` of ``total``: a linear warm-up over a tenth of the steps (at least 1, at most
    :data:`WARMUP_STEPS`), then a cosine from ``lr`` down to 0 at ``total``."""
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
