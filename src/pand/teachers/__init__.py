"""Frozen teachers and the sources that deliver their outputs to distillers."""

from pand.teachers.clip import DEFAULT_LOGIT_SCALE, RANDOM_WEIGHTS, ClipTeacher, load_clip_teacher, weights_digest
from pand.teachers.source import IMAGE_EMBEDS, LiveTeacherSource

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "IMAGE_EMBEDS",
    "RANDOM_WEIGHTS",
    "ClipTeacher",
    "LiveTeacherSource",
    "load_clip_teacher",
    "weights_digest",
]
