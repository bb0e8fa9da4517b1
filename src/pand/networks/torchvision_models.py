"""torchvision classification networks as backbones: the classifier stripped, ImageNet weights by name or from a
local file, refused at once offline when not cached."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError
from pand.networks.hub import (
    OFFLINE_SUGGESTION,
    hub_offline,
    is_network_error,
    offline_refusal,
    torch_hub_checkpoint,
)
from pand.networks.weights import load_weights_file

# Attribute names under which torchvision classification models keep their final classifier.
TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


def strip_torchvision_head(model: nn.Module, name: str) -> nn.Module:
    for attr in TORCHVISION_HEADS:
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            model._pand_head_name = attr
            return model
        if isinstance(head, nn.Sequential):
            # Keep pre-classifier layers (e.g. ConvNeXt's LayerNorm + Flatten), drop only the last Linear.
            linear_idx = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linear_idx:
                head[linear_idx[-1]] = nn.Identity()
                # The state-dict name of the child: its index, or its key in an OrderedDict (ViT's heads.head).
                model._pand_head_name = f"{attr}.{list(head._modules)[linear_idx[-1]]}"
                return model
    raise ConfigError(f"cannot find the classifier of torchvision model {name!r} to replace it")


def _torchvision_weights(name: str, pretrained: bool | str) -> str:
    """The torchvision weights of ``name`` to download: ``DEFAULT`` for ``pretrained=True``, else the named ones
    (``IMAGENET1K_V1``: the first ImageNet weights, which ``pretrained=True`` meant before torchvision 0.13)."""
    if pretrained is True:
        return "DEFAULT"
    import torchvision

    try:
        known = [w.name for w in torchvision.models.get_model_weights(name)]
    except (ValueError, KeyError):
        known = []
    if pretrained not in known:
        raise ConfigError(f"student.pretrained={pretrained!r} is not a weights name of torchvision {name!r}; it has "
                          f"{', '.join(known) or 'none'} (or true for DEFAULT, false for none)")
    return str(pretrained)


def torchvision_backbone(
    name: str, pretrained: bool | str, weights_file: str | None, kwargs: Mapping[str, Any]
) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"{name!r} is not a torchvision classification model")
    weights = _torchvision_weights(name, pretrained) if pretrained and weights_file is None else None
    local = (f"train from scratch with student.pretrained=false or give a local file: "
             f"student.weights=/path/to/{name}.pth")
    if weights is not None:
        _torchvision_offline_check(name, weights, local)
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (TypeError, ValueError) as err:  # torchvision refuses unknown options and ones that contradict the weights
        raise ConfigError(f"torchvision model {name!r} does not take student.kwargs {dict(kwargs)}: {err}") from err
    except Exception as err:  # noqa: BLE001 - network failures come in many types
        hint = f"{OFFLINE_SUGGESTION}. Offline, either {local}" if is_network_error(err) else f"Offline, either {local}"
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of student {name!r} ({err}). {hint}"
        ) from err
    if weights_file is not None:
        try:
            missing, unexpected = model.load_state_dict(load_weights_file(weights_file), strict=False)
        except RuntimeError as err:  # shape mismatches are raised even with strict=False
            detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4]) or str(err)
            raise WeightsUnavailableError(f"{weights_file} does not fit torchvision {name}: {detail}") from err
        if unexpected or [k for k in missing if not k.startswith(TORCHVISION_HEADS)]:
            raise WeightsUnavailableError(
                f"{weights_file} does not fit torchvision {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return strip_torchvision_head(model, name)


def _torchvision_offline_check(name: str, weights: str, local: str) -> None:
    """With HF_HUB_OFFLINE=1, refuse at once torchvision weights that are not in torch hub's cache
    (see :mod:`pand.networks.hub`): torchvision would otherwise try to download them."""
    if not hub_offline():
        return
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name)[weights].url
    except Exception:  # noqa: BLE001 - no weights enum: torchvision will say so itself
        return
    target = torch_hub_checkpoint(url)
    if not target.is_file():
        raise WeightsUnavailableError(offline_refusal(
            f"the ImageNet weights of student {name!r} ({os.path.basename(url)}, from {url}) are not in the local "
            f"cache {target.parent}", f"either {local}",
        ))
