"""Student networks: a backbone that yields pooled features and a linear classifier on top."""

from pand.students.cifar import create_cifar_model, list_cifar_models
from pand.students.factory import Student, build_student, load_weights_file

__all__ = ["Student", "build_student", "create_cifar_model", "list_cifar_models", "load_weights_file"]
