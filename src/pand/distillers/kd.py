"""Hinton KD on the teacher's class logits, optionally logit-standardised (LS, CVPR 2024).

``L = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``. The teacher's logits
``z_t`` are a classifier teacher's own, or a CLIP teacher's zero-shot logits ``s * t_img @ T_txt^T`` (learned CoOp
features in place of the template embeddings when ``teacher.text_features`` is set). With ``standardize=true`` both
logit vectors are z-scored per sample before the temperature (LS; its authors pair it with T 2 and kd_weight 9 on
CIFAR-100).
"""

from __future__ import annotations

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.losses import kd_loss, logit_standardize
from pand.rules import BOOL, POSITIVE, WEIGHT
from pand.students import Student
from pand.teachers.outputs import LOGITS


def standardized(student_logits, teacher_logits, standardize: bool):
    """Both logit vectors z-scored per sample when ``standardize`` (LS), else unchanged."""
    if not standardize:
        return student_logits, teacher_logits
    return logit_standardize(student_logits), logit_standardize(teacher_logits)


@register_distiller("kd")
class KD(Distiller):
    requires = frozenset({LOGITS})
    option_rules = {"temperature": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT, "standardize": BOOL}

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 2.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.standardize = bool(standardize)

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits = self.student(batch["image"])
        s, t = standardized(logits, teacher[LOGITS], self.standardize)
        return DistillerOutput(
            logits,
            {
                "ce": self.ce_weight * self.cross_entropy(logits, batch),
                "kd": self.kd_weight * kd_loss(s, t, self.temperature),
            },
        )
