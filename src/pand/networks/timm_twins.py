"""torchvision networks that timm also has, weight for weight: a torchvision student's weights under timm's names.

Two kinds of twin, both found by building the pair with random weights and random batch-norm statistics and seeing
their outputs agree exactly (torchvision 0.2x, timm 1.0):

* :data:`TORCHVISION_IN_TIMM`: the timm model of the same name has the same state-dict keys (ResNets, ResNeXts,
  Wide ResNets and DenseNets: ``conv1``/``bn1``/``layerN``/``downsample``, DenseNet's ``features.*``).
* :data:`TORCHVISION_RENAMED_IN_TIMM`: the timm model holds the same tensors, in the same order and of the same
  shapes, under other names (torchvision ``mobilenet_v2``'s ``features.N.conv.M`` are timm ``mobilenetv2_100``'s
  ``conv_stem``, ``blocks.S.B.conv_pw``, ..., ``conv_head``), so the keys are matched by position
  (:func:`timm_state_dict`).

Export folders that timm or open_clip build on their own use them (:mod:`pand.export_timm`,
:mod:`pand.export_open_clip`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pand.errors import PandError

#: torchvision students whose timm namesake has the same state-dict keys and computes the same function (the
#: classifier, ``fc`` or DenseNet's ``classifier``, too).
TORCHVISION_IN_TIMM = {name: name for name in (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "densenet121", "densenet161", "densenet169",
    "densenet201",
)}
#: torchvision students whose timm twin holds the same tensors in the same order under other key names.
TORCHVISION_RENAMED_IN_TIMM = {"mobilenet_v2": "mobilenetv2_100"}


def timm_twin(name: str) -> str | None:
    """The timm model that computes what torchvision ``name`` does with the same weights; None if timm has none."""
    return TORCHVISION_IN_TIMM.get(name) or TORCHVISION_RENAMED_IN_TIMM.get(name)


def timm_state_dict(name: str, state: Mapping[str, torch.Tensor],
                    timm_keys: Mapping[str, torch.Size | tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """torchvision ``name``'s weights ``state`` (its own keys, in its own order, classifier included) under the keys
    of its timm twin, whose state dict's shapes are ``timm_keys`` (in the twin's order). Raises :class:`PandError`
    where the two do not line up tensor for tensor."""
    if name in TORCHVISION_IN_TIMM:
        return dict(state)
    if name not in TORCHVISION_RENAMED_IN_TIMM:
        raise PandError(f"torchvision {name!r} has no timm twin")
    twin = TORCHVISION_RENAMED_IN_TIMM[name]
    if len(state) != len(timm_keys):
        raise PandError(f"torchvision {name!r} has {len(state)} tensors and timm {twin!r} {len(timm_keys)}: they are "
                        "not the same network")
    renamed = {}
    for (ours, tensor), (theirs, shape) in zip(state.items(), timm_keys.items()):
        # the last name part (weight, bias, running_mean, ...) guards against two same-shaped tensors swapped
        if ours.rsplit(".", 1)[-1] != theirs.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(shape):
            raise PandError(f"torchvision {name!r} and timm {twin!r} differ at {ours} {tuple(tensor.shape)} vs "
                            f"{theirs} {tuple(shape)}: they are not the same network")
        renamed[theirs] = tensor
    return renamed
