"""Frozen teachers and the sources that deliver their outputs to distillers.

The names below load their module (and torch) on first use, so that importing a light submodule such as
:mod:`pand.teachers.standin_fit` (the ``pand teacher fit`` command line) does not.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassifierTeacher": "classifier",
    "load_classifier_teacher": "classifier",
    "EnsembleTeacher": "ensemble",
    "DEFAULT_LOGIT_SCALE": "clip",
    "RANDOM_WEIGHTS": "clip",
    "ClipTeacher": "clip",
    "load_clip_teacher": "clip",
    "weights_digest": "clip",
    "IMAGE_EMBEDS": "outputs",
    "LOGITS": "outputs",
    "MEMBER_LOGITS": "outputs",
    "STAGE_FEATURES": "outputs",
    "FrozenTeacher": "frozen",
    "LiveTeacherSource": "source",
    "ZeroShotLogits": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pand.teachers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
