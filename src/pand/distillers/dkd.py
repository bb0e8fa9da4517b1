"""Decoupled KD (Zhao et al., CVPR 2022), optionally logit-standardised (LS).

Classical KD splits into a target-class term (TCKD: teacher and student agree on how likely the true class is) and a
non-target term (NCKD: how the rest of the probability is spread), the latter weighted down by the teacher's
confidence. DKD weights them freely:

``L = ce_weight * CE + warm * (alpha * TCKD + beta * NCKD)``, ``warm = min((epoch + 1) / warmup_epochs, 1)``

(epochs counted from 1 as in the reference recipe). CIFAR-100 defaults: alpha 1, beta 8, T 4, warm-up 20 epochs;
ImageNet ResNet-34 -> ResNet-18: beta 0.5, T 1, warm-up 1.
"""

from __future__ import annotations

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.kd import standardized
from pand.distillers.registry import register_distiller
from pand.losses import dkd_terms
from pand.rules import BOOL, POSITIVE, WEIGHT, integer
from pand.students import Student
from pand.teachers.outputs import LOGITS


@register_distiller("dkd")
class DKD(Distiller):
    requires = frozenset({LOGITS})
    option_rules = {"temperature": POSITIVE, "alpha": WEIGHT, "beta": WEIGHT, "ce_weight": WEIGHT,
                    "warmup_epochs": integer(0), "standardize": BOOL}

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.ce_weight, self.warmup_epochs, self.standardize = float(ce_weight), int(warmup_epochs), bool(standardize)

    def warmup(self, progress: Progress) -> float:
        return 1.0 if self.warmup_epochs <= 0 else min((progress.epoch + 1) / self.warmup_epochs, 1.0)

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits = self.student(batch["image"])
        s, t = standardized(logits, teacher[LOGITS], self.standardize)
        tckd, nckd = dkd_terms(s, t, self.target_classes(batch, teacher[LOGITS]), self.temperature)
        warm = self.warmup(progress)
        return DistillerOutput(
            logits,
            {
                "ce": self.ce_weight * self.cross_entropy(logits, batch),
                "tckd": warm * self.alpha * tckd.mean(),
                "nckd": warm * self.beta * nckd.mean(),
            },
            {"dkd_warmup": warm},
        )
