"""Hinton KD on the teacher's class logits, optionally logit-standardised (LS, CVPR 2024).

``L = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``. The teacher's logits
``z_t`` are a classifier teacher's own, or a CLIP teacher's zero-shot logits ``s * t_img @ T_txt^T`` (learned CoOp
features in place of the template embeddings when ``teacher.text_features`` is set). With ``standardize=true`` both
logit vectors are z-scored per sample before the temperature (LS; its authors pair it with T 2 and kd_weight 9 on
CIFAR-100).

With a teacher ensemble (``teacher=ensemble``), ``members`` says which teacher distribution the KD term matches:
``mean`` (default) the ensemble's ``logits``, the log of its members' averaged softmax, like every logit method;
``each`` every member's own logits ``z_m`` (``member_logits``), ``kd = sum_m w_m * T^2 * KL(softmax(z_m / T) ||
softmax(z_s / T))`` with the member weights ``w`` (summing to 1; equal unless ``teacher.member_weights``), LS
applying to each member's logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.errors import ConfigError
from pand.losses import kd_loss, logit_standardize
from pand.rules import BOOL, POSITIVE, WEIGHT, choice
from pand.students import Student
from pand.teachers.outputs import LOGITS, MEMBER_LOGITS

#: ``method.members``: which teacher distribution the KD term matches (see the module docstring).
MEMBER_MODES = ("mean", "each")


def standardized(student_logits, teacher_logits, standardize: bool):
    """Both logit vectors z-scored per sample when ``standardize`` (LS), else unchanged."""
    if not standardize:
        return student_logits, teacher_logits
    return logit_standardize(student_logits), logit_standardize(teacher_logits)


@register_distiller("kd")
class KD(Distiller):
    requires = frozenset({LOGITS})
    option_rules = {"temperature": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT, "standardize": BOOL,
                    "members": choice(*MEMBER_MODES)}

    @classmethod
    def requires_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        # each member's logits only when asked: the average (``logits``) is what every teacher provides
        return frozenset({MEMBER_LOGITS}) if options.get("members", "mean") == "each" else cls.requires

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 2.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        standardize: bool = False,
        members: str = "mean",
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.standardize = bool(standardize)
        self.members = str(members)
        # An instance-level ``requires``: what the engine asks the teacher source for with these options.
        self.requires = self.requires_for({"members": self.members})
        weights = context.member_weights if context is not None else None
        self.member_weights = None if weights is None else [float(w) for w in weights]

    def kd_term(self, logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """``T^2 KL`` against the average (``members=mean``) or the weighted mean of it against each member."""
        if self.members == "mean":
            return kd_loss(*standardized(logits, teacher[LOGITS], self.standardize), self.temperature)
        member_logits = teacher[MEMBER_LOGITS]  # [B, M, C]
        count = member_logits.shape[1]
        weights = self.member_weights or [1.0 / count] * count
        if len(weights) != count:
            raise ConfigError(f"the teacher gives {count} members' logits and {len(weights)} member weights")
        return sum(w * kd_loss(*standardized(logits, member_logits[:, m], self.standardize), self.temperature)
                   for m, w in enumerate(weights))

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits = self.student(batch["image"])
        return DistillerOutput(
            logits,
            {
                "ce": self.ce_weight * self.cross_entropy(logits, batch),
                "kd": self.kd_weight * self.kd_term(logits, teacher),
            },
        )
