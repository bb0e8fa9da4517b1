"""Student networks: a backbone that yields pooled features and a linear classifier on top."""

from pand.students.cifar import create_cifar_model, list_cifar_models
from pand.students.factory import Student, build_student, load_weights_file

# Registers pand's 32-px ViT and Mixer in timm's registry.
from pand.students import small_timm  # noqa: E402,F401  isort: skip

__all__ = ["Student", "build_student", "create_cifar_model", "list_cifar_models", "load_weights_file"]
