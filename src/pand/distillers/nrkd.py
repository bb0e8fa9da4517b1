"""NRKD (neighbourhood relation-based KD, Pattern Recognition 2021 / Neural Networks 2025): relations between samples
and between positions, on top of logit KD.

``L = ce_weight * CE + kd_weight * KD_T(z_s, z_t) + response_weight * NLRD_k(z_s, z_t)
      + feature_weight * sum_i NRKD_feat(student_stage_i, teacher_stage_i)``

* The response term (NLRD, :func:`pand.losses.nlrd_loss`): each sample's ``k`` nearest batch neighbours in the
  teacher's logit space; the student's logit differences to them should be distributed as the teacher's (symmetric
  Jensen-Shannon divergence).
* The feature term (:func:`pand.losses.nrkd_feature_loss`): per paired stage, the map of local contrast between
  neighbouring positions (channel-mean squared differences, L2-normalised) should match. Channel counts and grid sizes
  may differ, so any CNN / ViT / MLP pair works. Stages whose grid has a single position at the run's input size (the
  last stages of a CNN at 32 px) have no neighbours and are left out; of the rest, the deepest ``n`` stages of student
  and teacher are paired, ``n`` the smaller count (or name them: ``method.stages`` for the student, ``teacher.stages``
  for the teacher).

The feature term reads the teacher's ``stage_features``, which only a live teacher computes: with it the teacher runs
every step. With ``feature_weight=0`` only logits are read and a teacher cache serves the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.kd import standardized
from pand.distillers.registry import register_distiller
from pand.errors import ConfigError
from pand.losses import kd_loss, nlrd_loss, nrkd_feature_loss, token_grid_side
from pand.networks.stages import (
    StageTap,
    check_stage_names,
    default_stages,
    pair_deepest,
    require_input_size,
    stage_shapes,
)
from pand.rules import BOOL, POSITIVE, WEIGHT, integer
from pand.students import Student
from pand.teachers.outputs import LOGITS, STAGE_FEATURES


def _positions(shape: Sequence[int]) -> int:
    """Spatial positions of a per-sample stage shape: H * W of a map, the patch count of tokens."""
    if len(shape) == 3:
        return int(shape[1]) * int(shape[2])
    return token_grid_side(int(shape[0]))[0] ** 2


@register_distiller("nrkd")
class NRKD(Distiller):
    requires = frozenset({LOGITS, STAGE_FEATURES})
    option_rules = {"temperature": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT, "response_weight": WEIGHT,
                    "feature_weight": WEIGHT, "k": integer(1), "standardize": BOOL}

    @classmethod
    def requires_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        if float(options.get("feature_weight", 1.0)) == 0.0:
            return frozenset({LOGITS})
        return cls.requires

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        response_weight: float = 1.0,
        feature_weight: float = 1.0,
        k: int = 3,
        stages: Sequence[str] | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature, self.k, self.standardize = float(temperature), int(k), bool(standardize)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.response_weight, self.feature_weight = float(response_weight), float(feature_weight)
        # An instance-level ``requires``: what the engine asks the teacher source for with these options.
        self.requires = self.requires_for({"feature_weight": self.feature_weight})
        self.stage_names: list[str] = []
        self._tap = None
        if STAGE_FEATURES in self.requires:
            if context is None or not context.stage_names:
                raise ConfigError("nrkd's feature term needs the teacher's stages (a live teacher); set "
                                  "method.feature_weight=0 to distil the responses only")
            input_size = require_input_size(student, "nrkd")
            if stages:
                names = check_stage_names(student, stages, "method.stages")
            else:
                names = default_stages(student, input_size)
            s_usable = [n for n, shape in zip(names, stage_shapes(student, names, input_size)) if _positions(shape) > 1]
            t_usable = [i for i, shape in enumerate(context.stage_shapes or []) if _positions(shape) > 1]
            if not s_usable or not t_usable:
                raise ConfigError(f"nrkd's feature term needs stages with more than one spatial position; at input "
                                  f"size {tuple(input_size)} the student has {len(s_usable)} and the teacher "
                                  f"{len(t_usable)}. Name others (method.stages, teacher.stages) or set "
                                  "method.feature_weight=0")
            self.stage_names, self.teacher_stage_index = pair_deepest(s_usable, t_usable)
            self._tap = StageTap(student, self.stage_names)
            self._tap.enabled = False

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        if self._tap is not None:
            self._tap.enabled = True
        try:
            logits = self.student(batch["image"])
            feats = self._tap.take() if self._tap is not None else []
        finally:
            if self._tap is not None:
                self._tap.enabled = False
        t = teacher[LOGITS]
        s_std, t_std = standardized(logits, t, self.standardize)
        losses = {
            "ce": self.ce_weight * self.cross_entropy(logits, batch),
            "kd": self.kd_weight * kd_loss(s_std, t_std, self.temperature),
            "nlrd": self.response_weight * nlrd_loss(logits, t, self.k),
        }
        if feats:
            t_feats = [teacher[STAGE_FEATURES][i] for i in self.teacher_stage_index]
            losses["nrkd_feat"] = self.feature_weight * sum(
                nrkd_feature_loss(s, t_f) for s, t_f in zip(feats, t_feats)
            )
        return DistillerOutput(logits, losses)
