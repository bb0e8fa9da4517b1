"""Build students by name from torchvision, timm or pand's own CIFAR networks (:mod:`pand.students.cifar`).

Every student is the same shape to the rest of pand: ``features(x)`` gives the pooled feature ``h`` (B x d), the
classifier ``linear_cls`` maps it to logits, and ``feature_dim`` is measured by a forward pass rather than read from
a table, so any torchvision or timm classifier works. The 32-px CIFAR networks of the KD literature (``resnet8x4``,
``resnet32x4``, ``wrn_40_2``, ...), which neither library has, come from source ``cifar``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

# Attribute names under which torchvision classification models keep their final classifier.
_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


class Student(nn.Module):
    """A backbone producing pooled features plus ``linear_cls: d -> num_classes``."""

    def __init__(self, backbone: nn.Module, num_classes: int, name: str) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = _measure_feature_dim(backbone)
        self.linear_cls = nn.Linear(self.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_cls(self.features(images))


def _measure_feature_dim(backbone: nn.Module) -> int:
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 64, 64))
    backbone.train(was_training)
    if out.dim() != 2:
        raise ConfigError(
            f"student backbone returned features of shape {tuple(out.shape)}; pand needs pooled B x d features"
        )
    return int(out.shape[1])


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal becomes one clear message
            raise WeightsUnavailableError(
                f"could not load {path} as a plain state dict ({err}); save it with torch.save(model.state_dict()) "
                "or as .safetensors"
            ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _strip_torchvision_head(model: nn.Module, name: str) -> nn.Module:
    for attr in _TORCHVISION_HEADS:
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model
        if isinstance(head, nn.Sequential):
            # Keep pre-classifier layers (e.g. ConvNeXt's LayerNorm + Flatten), drop only the last Linear.
            linear_idx = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linear_idx:
                head[linear_idx[-1]] = nn.Identity()
                return model
    raise ConfigError(f"cannot find the classifier of torchvision model {name!r} to replace it")


def _torchvision_backbone(name: str, pretrained: bool, weights_file: str | None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"{name!r} is not a torchvision classification model")
    weights = "DEFAULT" if pretrained and weights_file is None else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as err:  # noqa: BLE001 - network failures come in many types
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of student {name!r} ({err}). Offline, either train from "
            f"scratch with student.pretrained=false or give a local file: student.weights=/path/to/{name}.pth"
        ) from err
    if weights_file is not None:
        missing, unexpected = model.load_state_dict(load_weights_file(weights_file), strict=False)
        if unexpected or [k for k in missing if not k.startswith(_TORCHVISION_HEADS)]:
            raise WeightsUnavailableError(
                f"{weights_file} does not fit torchvision {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return _strip_torchvision_head(model, name)


def _timm_backbone(name: str, pretrained: bool, weights_file: str | None) -> nn.Module:
    import timm

    if not timm.list_models(name) and not timm.is_model(name):
        raise ConfigError(f"{name!r} is not a timm model name")
    try:
        model = timm.create_model(name, pretrained=pretrained and weights_file is None, num_classes=0)
    except Exception as err:  # noqa: BLE001
        raise WeightsUnavailableError(
            f"could not download the pretrained weights of timm model {name!r} ({err}). Offline, use "
            f"student.pretrained=false or student.weights=/path/to/weights.safetensors"
        ) from err
    if weights_file is not None:
        state = {k: v for k, v in load_weights_file(weights_file).items() if not k.startswith(("fc.", "head.fc.", "classifier.", "head."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"{weights_file} does not fit timm {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def _cifar_backbone(name: str, pretrained: bool, weights_file: str | None) -> nn.Module:
    from pand.students.cifar import create_cifar_model, is_cifar_model, list_cifar_models

    if not is_cifar_model(name):
        raise ConfigError(f"{name!r} is not one of pand's CIFAR networks; known: {', '.join(list_cifar_models())}")
    if pretrained and weights_file is None:
        raise WeightsUnavailableError(
            f"there are no pretrained weights to download for pand's CIFAR network {name!r}: train it from scratch "
            f"with student.pretrained=false or give a local state dict: student.weights=/path/to/{name}.pth"
        )
    model = create_cifar_model(name, num_classes=1)  # the classifier is replaced below; its width does not matter
    model = _strip_torchvision_head(model, name)
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


def _resolve_auto(name: str) -> str:
    """torchvision if it knows ``name``; pand's CIFAR networks for a name only they have; timm otherwise."""
    import torchvision

    from pand.students.cifar import is_cifar_model

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    if is_cifar_model(name):
        import timm

        if not timm.is_model(name):
            return "cifar"
    return "timm"


def build_student(
    name: str,
    num_classes: int,
    *,
    source: str = "auto",
    pretrained: bool = True,
    weights: str | None = None,
) -> Student:
    """A student by name: ``source`` is ``torchvision``, ``timm``, ``cifar`` or ``auto``.

    ``auto`` takes torchvision if it knows the name, else ``cifar`` for a name that only pand's CIFAR networks have
    (:func:`pand.students.cifar.list_cifar_models`), else timm. ``pretrained`` downloads ImageNet weights (the CIFAR
    networks have none: pass ``pretrained=False`` or ``weights``); ``weights`` loads a local checkpoint instead.
    """
    if source == "auto":
        source = _resolve_auto(name)
    if source == "torchvision":
        backbone = _torchvision_backbone(name, pretrained, weights)
    elif source == "timm":
        backbone = _timm_backbone(name, pretrained, weights)
    elif source == "cifar":
        backbone = _cifar_backbone(name, pretrained, weights)
    else:
        raise ConfigError(f"student.source must be torchvision, timm, cifar or auto, got {source!r}")
    return Student(backbone, num_classes, name)
