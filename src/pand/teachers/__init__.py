"""Frozen teachers and the sources that deliver their outputs to distillers."""

from pand.teachers.classifier import ClassifierTeacher, load_classifier_teacher
from pand.teachers.clip import DEFAULT_LOGIT_SCALE, RANDOM_WEIGHTS, ClipTeacher, load_clip_teacher, weights_digest
from pand.teachers.frozen import IMAGE_EMBEDS, LOGITS, STAGE_FEATURES, FrozenTeacher
from pand.teachers.source import LiveTeacherSource, ZeroShotLogits

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "IMAGE_EMBEDS",
    "LOGITS",
    "RANDOM_WEIGHTS",
    "STAGE_FEATURES",
    "ClassifierTeacher",
    "ClipTeacher",
    "FrozenTeacher",
    "LiveTeacherSource",
    "ZeroShotLogits",
    "load_classifier_teacher",
    "load_clip_teacher",
    "weights_digest",
]
