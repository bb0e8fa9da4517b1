"""Student networks: a backbone from :mod:`pand.networks` that yields pooled features and a linear classifier on top."""

from pand.students.factory import Student, build_student

# ``pand.students.cifar.create_cifar_model`` is the call pand's exported metadata names (:mod:`pand.export`).
from pand.students import cifar  # noqa: E402,F401  isort: skip

__all__ = ["Student", "build_student"]
