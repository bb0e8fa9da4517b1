"""A network by name as a backbone: it returns pooled ``B x d`` features, its classifier stripped.

Sources are torchvision, timm (:mod:`pand.networks.timm_models`, which includes pand's 32-px ``pand_*`` models) and
pand's own CIFAR networks (:mod:`pand.networks.cifar`); ``auto`` takes the first that knows the name
(:func:`resolve_source`). What a backbone needs to become a student (a classifier, a measured feature width) is
:mod:`pand.students`'s.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError
from pand.networks.cifar import create_cifar_model, is_cifar_model, list_cifar_models
from pand.networks.timm_models import timm_backbone, timm_default_hw, timm_head_name
from pand.networks.torchvision_models import strip_torchvision_head, torchvision_backbone
from pand.networks.weights import load_weights_file


def _cifar_backbone(name: str, pretrained: bool, weights_file: str | None) -> nn.Module:
    if not is_cifar_model(name):
        raise ConfigError(f"{name!r} is not one of pand's CIFAR networks; known: {', '.join(list_cifar_models())}")
    if pretrained and weights_file is None:
        raise WeightsUnavailableError(
            f"there are no pretrained weights to download for pand's CIFAR network {name!r}: train it from scratch "
            f"with student.pretrained=false or give a local state dict: student.weights=/path/to/{name}.pth"
        )
    model = create_cifar_model(name, num_classes=1)  # the classifier is replaced below; its width does not matter
    model = strip_torchvision_head(model, name)
    if weights_file is not None:
        state = {k: v for k, v in load_weights_file(weights_file).items() if not k.startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches are raised even with strict=False
            raise WeightsUnavailableError(f"{weights_file} does not fit pand's CIFAR {name}: {err}") from err
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"{weights_file} does not fit pand's CIFAR {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def resolve_source(name: str, source: str = "auto") -> str:
    """Where the model ``name`` comes from: ``source`` itself unless it is ``auto``; then torchvision if it knows
    ``name``, pand's CIFAR networks for a name only they have, timm otherwise."""
    if source != "auto":
        return source
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    if is_cifar_model(name):
        import timm

        if not timm.is_model(name):
            return "cifar"
    return "timm"


def build_backbone(
    name: str, source: str, *, pretrained: bool | str, weights: str | None, image_size: tuple[int, int] | None,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, str]:
    """The backbone ``name`` from ``source`` (``torchvision``, ``timm``, ``cifar`` or ``auto``) and the source it came
    from. ``pretrained`` downloads the library's weights (for torchvision it may name them), ``weights`` loads a local
    file instead; timm models that take ``img_size`` are built for ``image_size``; ``kwargs`` go to the library."""
    source = resolve_source(name, source)
    if isinstance(pretrained, str) and source != "torchvision":
        raise ConfigError(f"student.pretrained={pretrained!r} names torchvision weights, but {name!r} is a {source} "
                          "model: use true or false (timm models take a tag in the name, e.g. resnet18.a1_in1k)")
    if source == "torchvision":
        backbone = torchvision_backbone(name, pretrained, weights, kwargs)
    elif source == "timm":
        backbone = timm_backbone(name, pretrained, weights, image_size, kwargs)
    elif source == "cifar":
        if kwargs:
            raise ConfigError(f"pand's CIFAR networks take no student.kwargs, got {kwargs}")
        backbone = _cifar_backbone(name, pretrained, weights)
    else:
        raise ConfigError(f"student.source must be torchvision, timm, cifar or auto, got {source!r}")
    return backbone, source


def natural_size(backbone: nn.Module, source: str) -> tuple[int, int] | None:
    """The input size a backbone built without one runs at, where it has one (timm's patch models); else None."""
    return timm_default_hw(backbone) if source == "timm" else None


def head_path(backbone: nn.Module, source: str) -> str | tuple[str, ...] | None:
    """Where the library model keeps the classifier that the backbone had stripped (``fc``, ``classifier.1``, timm's
    ``head.fc``, ...; a tuple for timm's two-head models), so its weights can be written back under the library's own
    key names; None where unknown."""
    return timm_head_name(backbone) if source == "timm" else getattr(backbone, "_pand_head_name", None)
