"""pand's CIFAR networks under the name pand's exported weights give for them
(``pand.students.cifar.create_cifar_model(...)`` in :mod:`pand.export`'s metadata); they live in
:mod:`pand.networks.cifar`."""

from pand.networks.cifar import CifarResNet, CifarWideResNet, create_cifar_model, is_cifar_model, list_cifar_models

__all__ = ["CifarResNet", "CifarWideResNet", "create_cifar_model", "is_cifar_model", "list_cifar_models"]
