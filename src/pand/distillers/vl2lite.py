"""VL2Lite (CVPR 2025): condensation layers, visual and linguistic KD from a frozen CLIP, dynamic weighting.

``L = w_cls * CE(out, y) + (w_kd * L_img + w_kd * L_kd) / 2`` with

* ``a_img = norm(MLP_img(t_img))`` and ``A_txt = norm(MLP_txt(T_txt))``, two ``D -> d -> d`` condensation MLPs;
* ``L_img = mean |norm(h) - a_img|``;
* ``L_kd = scale * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` with ``z_s = s * norm(h) @ A_txt^T`` and
  ``z_t = s * t_img @ T_txt^T``.

Both distillation terms act on the student's features ``h``, never on its classifier head. An unlabelled training
image (``data.unlabelled``) therefore gets the head's term from the teacher instead of a label:
``teacher_ce = w_cls * CE(out, softmax(z_t))``, mean over the unlabelled samples (CE keeps the labelled ones), so the
head learns from every image and a label-free run trains one at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.losses import vl2lite_linguistic_loss, vl2lite_visual_loss, vl2lite_weights
from pand.rules import POSITIVE, WEIGHT, choice
from pand.students import Student
from pand.teachers.source import IMAGE_EMBEDS


def condensation_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """VL2Lite's condensation layer ("AlignNet"): Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))


@register_distiller("vl2lite")
class VL2Lite(Distiller):
    requires = frozenset({IMAGE_EMBEDS})
    needs_text_embeds = True
    option_rules = {"temperature": POSITIVE, "linguistic_scale": WEIGHT, "weight_schedule": choice("code", "paper")}

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 2.0,
        linguistic_scale: float = 0.5,
        weight_schedule: str = "code",
    ) -> None:
        super().__init__(student, num_classes, context)
        d, D = student.feature_dim, context.embed_dim
        self.image_condenser = condensation_mlp(D, d)
        self.text_condenser = condensation_mlp(D, d)
        self.temperature = float(temperature)
        self.linguistic_scale = float(linguistic_scale)
        vl2lite_weights(0, 1, weight_schedule)  # reject an unknown schedule now, not at the first step
        self.weight_schedule = weight_schedule

    def class_text_embeds(self) -> torch.Tensor:
        """``T_txt``: template embeddings here; PAND swaps in learned CoOp features."""
        return self.text_embeds

    def vl2lite_terms(self, batch, teacher, progress: Progress):
        """Student logits, features, teacher logits and VL2Lite's weighted loss terms, for reuse by PAND."""
        h = self.student.features(batch["image"])
        logits = self.student.linear_cls(h)
        t_img = teacher[IMAGE_EMBEDS].float()
        text = self.class_text_embeds()
        scale = self.context.logit_scale
        a_img = F.normalize(self.image_condenser(t_img), dim=-1)
        a_txt = F.normalize(self.text_condenser(text), dim=-1)
        student_text_logits = scale * F.normalize(h.float(), dim=-1) @ a_txt.float().t()
        teacher_logits = self.teacher_logits(t_img, text)
        w_cls, w_kd = vl2lite_weights(progress.epoch, progress.max_epochs, self.weight_schedule)
        losses = {
            "ce": w_cls * self.cross_entropy(logits, batch),
            "visual_kd": 0.5 * w_kd * vl2lite_visual_loss(h, a_img),
            "linguistic_kd": 0.5
            * w_kd
            * vl2lite_linguistic_loss(student_text_logits, teacher_logits, self.temperature, self.linguistic_scale),
        }
        soft = self.teacher_soft_cross_entropy(logits, batch, teacher_logits)
        if soft is not None:  # unlabelled samples: the teacher's (zero-shot or CoOp) distribution trains the head
            losses["teacher_ce"] = w_cls * soft
        return logits, teacher_logits, losses, {"w_cls": w_cls, "w_kd": w_kd}

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits, _, losses, logs = self.vl2lite_terms(batch, teacher, progress)
        return DistillerOutput(logits, losses, logs)
