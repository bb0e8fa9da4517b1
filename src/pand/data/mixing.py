"""Mixup and CutMix on training batches, reproducible step by step.

The recipes for ViT and MLP students (DeiT's, used by OFA-KD and PAT) mix pairs of training images: Mixup blends two
images ``lam * x_i + (1 - lam) * x_j``, CutMix pastes a box of ``x_j`` into ``x_i`` (``lam`` is then the area left to
``x_i``), with ``lam ~ Beta(alpha, alpha)`` and ``j`` the batch reversed. The targets mix the same way:
``soft_label = lam * onehot(y_i) + (1 - lam) * onehot(y_j)``, smoothed by ``label_smoothing``.

Mixing happens in the training step, before the teacher sees the batch, so a live teacher scores exactly the mixed
images the student sees. A teacher cache stores outputs of unmixed views, so mixing and ``cache.dir`` are refused
together. The batch keeps ``label`` as the class with the larger share (for methods that need one class per sample,
such as DKD's target mask) and gains ``soft_label`` ``[B, C]`` for the cross-entropy terms
(:meth:`pand.distillers.Distiller.cross_entropy`).

Why not timm's ``Mixup``: it draws from numpy's global generator, so a resumed run would mix differently. Here every
step draws from a generator seeded by (seed, global step), which a resume reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from pand.errors import ConfigError


def mixing_enabled(settings: Mapping[str, Any] | None) -> bool:
    """Whether the ``mixing`` settings mix training batches (a method that cannot learn from mixed batches refuses
    them in its ``check_config``)."""
    s = settings or {}
    return float(s.get("prob", 1.0)) > 0 and (float(s.get("mixup_alpha", 0)) > 0 or float(s.get("cutmix_alpha", 0)) > 0)


class BatchMixer:
    """Mixes a batch dict (``image``, ``label``) with Mixup or CutMix; see the module docstring."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError("mixing.mixup_alpha and mixing.cutmix_alpha must be >= 0")
        self.num_classes = int(num_classes)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.label_smoothing, self.seed = float(label_smoothing), int(seed)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any] | None, num_classes: int, seed: int) -> BatchMixer | None:
        if not mixing_enabled(settings):
            return None
        return cls(num_classes, seed=seed, **dict(settings))

    def _draw(self, step: int) -> tuple[str, float, torch.Generator]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        if torch.rand((), generator=g).item() >= self.prob:
            return "none", 1.0, g
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or torch.rand((), generator=g).item() < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = _beta(alpha, g)
        return ("cutmix" if use_cutmix else "mixup"), lam, g

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        mode, lam, g = self._draw(step)
        partner = labels.flip(0)
        if mode == "mixup":
            images = lam * images + (1.0 - lam) * images.flip(0)
        elif mode == "cutmix":
            h, w = images.shape[-2:]
            top, bottom, left, right = _box(h, w, lam, g)
            images = images.clone()
            images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(h * w)  # the area actually pasted
        off = self.label_smoothing / self.num_classes
        one_hot = F.one_hot(labels, self.num_classes).float()
        soft = lam * one_hot + (1.0 - lam) * F.one_hot(partner, self.num_classes).float()
        soft = soft * (1.0 - self.label_smoothing) + off
        out = dict(batch)
        out["image"] = images
        out["soft_label"] = soft.to(images.device)
        out["label"] = labels if lam >= 0.5 else partner
        return out


def _beta(alpha: float, g: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from two Gamma draws made with ``g`` (torch's Beta sampler takes no generator)."""
    a = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=g)
    return float(a[0] / a.sum())


def _box(h: int, w: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the image, centred uniformly at random and clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    bh, bw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (), generator=g))
    cx = int(torch.randint(0, w, (), generator=g))
    top, bottom = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    left, right = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    return top, bottom, left, right
