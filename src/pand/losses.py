"""Loss functions as plain functions on tensors.

Each one is written from the formula in METHODS.md and unit-tested against an independent computation. All reduce to
a scalar, compute in float32 whatever the autocast dtype, and average over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Names of the two dynamic-weight schedules of VL2Lite (see :func:`vl2lite_weights`).
WEIGHT_SCHEDULES = ("code", "paper")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, KL summed over classes, mean over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t


def vl2lite_visual_loss(student_features: torch.Tensor, condensed_image_embeds: torch.Tensor) -> torch.Tensor:
    """VL2Lite visual KD: ``mean |norm(h) - a_img|`` (L1 averaged over B x d).

    ``student_features`` is the raw pooled feature ``h`` (normalised here); ``condensed_image_embeds`` is
    ``norm(MLP_img(t_img))``.
    """
    return (F.normalize(student_features.float(), dim=-1) - condensed_image_embeds.float()).abs().mean()


def vl2lite_linguistic_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0, scale: float = 0.5
) -> torch.Tensor:
    """VL2Lite linguistic KD: ``scale * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (batch mean).

    ``scale = 0.5`` is the paper's ``T^2 / 2`` (what the authors' element-wise-mean KLDivLoss times ``C/2`` works out
    to); PAND's code with CoOp features uses ``scale = 1``. The scale is explicit so that nobody depends on a reduction.
    """
    return scale * kd_loss(student_logits, teacher_logits, temperature)


def vl2lite_weights(epoch: int, max_epochs: int, schedule: str = "code") -> tuple[float, float]:
    """VL2Lite's dynamic weights ``(w_cls, w_kd)`` with ``w_kd = 1 - w_cls``.

    ``code``:  ``w_cls = clip(epoch / (8 * max_epochs), 0, 1)``, as the authors' code computes it (w_cls <= 0.125);
               the published numbers come from this form.
    ``paper``: ``w_cls = clip(epoch / (max_epochs / 8), 0, 1)``, the paper's description (CE at full weight after the
               first eighth of training, KD off from then on).
    """
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be positive, got {max_epochs}")
    if schedule == "code":
        w_cls = epoch / (8.0 * max_epochs)
    elif schedule == "paper":
        w_cls = epoch / (max_epochs / 8.0)
    else:
        raise ValueError(f"unknown VL2Lite weight schedule {schedule!r}; choose one of {WEIGHT_SCHEDULES}")
    w_cls = min(max(w_cls, 0.0), 1.0)
    return w_cls, 1.0 - w_cls
