"""OFA-KD (Hao et al., NeurIPS 2023): one-for-all distillation across architectures through exit branches.

Each chosen student stage gets an exit branch that maps its feature (a CNN map or ViT/MLP tokens) to class logits,
and every branch as well as the student's own output learns from the teacher's final logits with OFA's adaptive
target ``-sum_c [(p_t + y)^eps - y]_c log p_s,c`` (see :func:`pand.losses.ofa_loss`):

``L = ce_weight * CE + kd_weight * OFA(z_s) + ofa_weight * sum_i OFA(branch_i(stage_i))``.

Only the teacher's final logits are read, so any teacher works and a CLIP teacher's cache serves it. The branches are
training-only: they live in the distiller (saved in checkpoints, never part of the exported student). Stage features
come from forward hooks (:class:`~pand.networks.stages.StageTap`); branch shapes from a dry run at the run's input
size, so 32-px CIFAR works as well as 224 px. The stages are ``method.stages`` when given, else every stage
:func:`~pand.networks.stages.default_stages` finds but the last; each branch brings its stage down to the resolution
of the map the student pools (of the deepest named stage, for a network whose stages only a user can tell).
Channels-last stage outputs (timm's Swin) arrive as ``[B, C, H, W]``: the tap rearranges them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.ofa_branches import build_exit_branch
from pand.distillers.registry import register_distiller
from pand.errors import ConfigError
from pand.losses import ofa_loss, token_grid_side
from pand.networks.stages import (
    StageTap,
    check_stage_names,
    default_stages,
    require_input_size,
    stage_shapes,
)
from pand.rules import POSITIVE, WEIGHT, integer
from pand.students import Student
from pand.teachers.outputs import LOGITS


def _spatial(shape: Sequence[int]) -> int:
    """The side of a stage's grid: H of a C x H x W map, the patch-grid side of N x C tokens."""
    if len(shape) == 3:
        return int(shape[1])
    return token_grid_side(int(shape[0]))[0]


@register_distiller("ofa")
class OFA(Distiller):
    requires = frozenset({LOGITS})
    option_rules = {"temperature": POSITIVE, "eps": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT,
                    "ofa_weight": WEIGHT, "branch_depth": integer(1)}

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 1.0,
        eps: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        ofa_weight: float = 1.0,
        stages: Sequence[str] | None = None,
        branch_depth: int = 1,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature, self.eps = float(temperature), float(eps)
        self.ce_weight, self.kd_weight, self.ofa_weight = float(ce_weight), float(kd_weight), float(ofa_weight)
        input_size = require_input_size(student, "ofa")
        if stages:
            names = check_stage_names(student, stages, "method.stages")
            try:
                final = default_stages(student, input_size)[-1:]
            except ConfigError:
                final = []  # stages the finder cannot tell: the branches reduce to the deepest named one instead
        else:
            every = default_stages(student, input_size)
            names, final = every[:-1], every[-1:]  # the last stage already ends in the student's own head
        shapes = stage_shapes(student, names + final, input_size)
        target = _spatial(shapes[-1])
        self.stage_names = names
        self.branches = nn.ModuleList(
            # the factory reads the layout from the rank of a batched shape (4-D map, 3-D tokens)
            build_exit_branch((1, *shape), num_classes, target_hw=target, depth=int(branch_depth))
            for shape in shapes[:len(names)]
        )
        self._tap = StageTap(student, names)
        self._tap.enabled = False

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        self._tap.enabled = True
        try:
            logits = self.student(batch["image"])
            feats = self._tap.take()
        finally:
            self._tap.enabled = False
        t = teacher[LOGITS]
        y = self.target_classes(batch, t)
        losses = {
            "ce": self.ce_weight * self.cross_entropy(logits, batch),
            "ofa": self.kd_weight * ofa_loss(logits, t, y, eps=self.eps, temperature=self.temperature),
        }
        if self.branches:
            branch = sum(ofa_loss(head(f), t, y, eps=self.eps, temperature=self.temperature)
                         for head, f in zip(self.branches, feats))
            losses["ofa_stages"] = self.ofa_weight * branch
        return DistillerOutput(logits, losses)
