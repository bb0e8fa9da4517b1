"""Hinton KD on the CLIP teacher's zero-shot logits ``z_t = s * t_img @ T_txt^T``."""

from __future__ import annotations

import torch.nn.functional as F

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.losses import kd_loss
from pand.students import Student
from pand.teachers.source import IMAGE_EMBEDS
from pand.validation import POSITIVE, WEIGHT


@register_distiller("kd")
class ZeroShotKD(Distiller):
    requires = frozenset({IMAGE_EMBEDS})
    needs_text_embeds = True
    option_rules = {"temperature": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT}

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 2.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits = self.student(batch["image"])
        teacher_logits = self.teacher_logits(teacher[IMAGE_EMBEDS])
        return DistillerOutput(
            logits,
            {
                "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["label"]),
                "kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature),
            },
        )
