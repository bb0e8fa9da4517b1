"""Distillation methods. Importing this package registers every built-in method.

A new method is one module here (a :class:`Distiller` subclass decorated with ``@register_distiller("name")``, imported
below) plus one config ``configs/method/<name>.yaml``.
"""

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import build_distiller, get_distiller_class, list_distillers, register_distiller

# Registration side effects: each module registers its method.
from pand.distillers import ce, dkd, kd, nrkd, ofa, open_vocab, pand, pat, vl2lite  # noqa: E402,F401  isort: skip

__all__ = [
    "Distiller",
    "DistillerOutput",
    "Progress",
    "TeacherContext",
    "build_distiller",
    "get_distiller_class",
    "list_distillers",
    "register_distiller",
]
