"""The student alone, trained with cross-entropy: the baseline every distiller must beat."""

from __future__ import annotations

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.rules import number
from pand.students import Student


@register_distiller("ce")
class CrossEntropy(Distiller):
    option_rules = {"label_smoothing": number(0, 1, high_open=True)}

    def __init__(
        self, student: Student, num_classes: int, context: TeacherContext | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(student, num_classes, context)
        self.label_smoothing = float(label_smoothing)

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits = self.student(batch["image"])
        ce = self.cross_entropy(logits, batch, self.label_smoothing)
        return DistillerOutput(logits, {"ce": ce})
