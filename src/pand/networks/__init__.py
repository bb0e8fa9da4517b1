"""Networks by name, a floor below teachers and students: both build theirs here.

* :mod:`~pand.networks.backbones`: a torchvision, timm or pand CIFAR network by name as a pooled-feature backbone
  (:mod:`~pand.networks.torchvision_models`, :mod:`~pand.networks.timm_models`, :mod:`~pand.networks.cifar`);
* :mod:`~pand.networks.small_timm`: pand's 32-px ViT and Mixer, registered in timm's registry on import of this package;
* :mod:`~pand.networks.weights`: state dicts from local weight files;
* :mod:`~pand.networks.hub`: pretrained weights on machines without network (``HF_HUB_OFFLINE``) and pand's one
  message for weights it cannot obtain;
* :mod:`~pand.networks.stages`: a network's intermediate stages, found and read with forward hooks;
* :mod:`~pand.networks.sizes`: input sizes and patch grids.
"""

from pand.networks.backbones import build_backbone, head_path, natural_size, resolve_source
from pand.networks.cifar import create_cifar_model, is_cifar_model, list_cifar_models
from pand.networks.weights import load_weights_file

# Registers pand's 32-px ViT and Mixer in timm's registry.
from pand.networks import small_timm  # noqa: E402,F401  isort: skip

__all__ = [
    "build_backbone", "create_cifar_model", "head_path", "is_cifar_model", "list_cifar_models", "load_weights_file",
    "natural_size", "resolve_source",
]
