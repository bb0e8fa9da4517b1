"""Students by name: a backbone from :mod:`pand.networks` (torchvision, timm or pand's own CIFAR networks) with a
linear classifier on top.

Every student is the same shape to the rest of pand: ``features(x)`` gives the pooled feature ``h`` (B x d), the
classifier ``linear_cls`` maps it to logits, and ``feature_dim`` is measured by a forward pass rather than read from
a table, so any torchvision or timm classifier works. The 32-px CIFAR networks of the KD literature (``resnet8x4``,
``resnet32x4``, ``wrn_40_2``, ...), which neither library has, come from source ``cifar``.

ViTs, MLP-Mixers and Swins are built for one input size (224 px in timm's defaults). Given the run's ``image_size``,
:func:`build_student` builds timm models that take ``img_size`` for that size and measures the feature width there,
so the same names serve 32-px CIFAR; a model that cannot run at that size is refused with what to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pand.errors import ConfigError
from pand.networks.backbones import build_backbone, head_path, natural_size
from pand.networks.sizes import image_hw, patch_size

# Side of the dry pass that measures the feature width when the run's input size is not known; any CNN runs at it.
_DEFAULT_MEASURE_SIDE = 64


class Student(nn.Module):
    """A backbone producing pooled features plus ``linear_cls: d -> num_classes``.

    ``head_name`` is where the library model keeps the classifier that ``linear_cls`` stands in for (``fc``,
    ``classifier.1``, ``heads.head``, timm's ``head.fc``, ...; a tuple for timm's distilled two-head models), so the
    weights can be written back under the library's own key names (:mod:`pand.export`). None where unknown.
    """

    head_name: str | tuple[str, ...] | None = None

    def __init__(
        self, backbone: nn.Module, num_classes: int, name: str, image_size: int | Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = _measure_feature_dim(backbone, name, image_hw(image_size or _DEFAULT_MEASURE_SIDE))
        self.linear_cls = nn.Linear(self.feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.linear_cls.out_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_cls(self.features(images))


def _check_patch_grid(model: nn.Module, name: str, hw: tuple[int, int]) -> None:
    # timm's patch embedding is a strided convolution: a size the patch does not divide loses its border silently.
    patch = patch_size(model)
    if patch is None or (hw[0] % patch[0] == 0 and hw[1] % patch[1] == 0):
        return
    raise ConfigError(
        f"student {name!r} has {patch[0]} x {patch[1]} patches, which do not tile the {hw[0]} x {hw[1]} px input (the "
        f"border would be dropped). Use a patch size that divides it (e.g. +student.kwargs.patch_size=4, where the "
        f"model's timm entry point takes one), a variant with smaller patches, or a data.image_size that is a "
        f"multiple of {patch[0]}"
    )


def _measure_feature_dim(backbone: nn.Module, name: str, hw: tuple[int, int]) -> int:
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, *hw))
    except Exception as err:  # noqa: BLE001 - models refuse an input size with assertions, shape and value errors
        raise ConfigError(
            f"student {name!r} cannot run at {hw[0]} x {hw[1]} px ({type(err).__name__}: {err}). ViT, MLP and Swin "
            f"students are built for data.image_size when their timm constructor takes img_size; otherwise set the "
            f"size or a smaller patch, window or depth in student.kwargs (e.g. +student.kwargs.patch_size=4), or use "
            f"a data.image_size the model was made for"
        ) from err
    finally:
        backbone.train(was_training)
    if out.dim() != 2:
        raise ConfigError(
            f"student backbone returned features of shape {tuple(out.shape)}; pand needs pooled B x d features"
        )
    return int(out.shape[1])


def build_student(
    name: str,
    num_classes: int,
    *,
    source: str = "auto",
    pretrained: bool | str = True,
    weights: str | None = None,
    image_size: int | Sequence[int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Student:
    """A student by name: ``source`` is ``torchvision``, ``timm``, ``cifar`` or ``auto``.

    ``auto`` takes torchvision if it knows the name, else ``cifar`` for a name that only pand's CIFAR networks have
    (:func:`pand.networks.cifar.list_cifar_models`), else timm. ``pretrained`` downloads ImageNet weights (the CIFAR
    networks have none: pass ``pretrained=False`` or ``weights``); for a torchvision model it may also name the weights
(``"IMAGENET1K_V1"``); ``weights`` loads a local checkpoint instead.

    ``image_size`` is the run's input side (or ``(H, W)``): timm models whose constructor takes ``img_size`` are built
    for it, the feature width is measured at it and it is kept as ``student.input_size``; a model that cannot run
    at it raises :class:`ConfigError`. Without it, timm models keep their default size, where patch models (ViT,
    Mixer, Swin) are measured; other models are measured at 64 px. ``kwargs`` (``student.kwargs``) go to ``timm.create_model`` or torchvision's
    ``get_model``, e.g. ``{"patch_size": 4, "depth": 6}``; the CIFAR networks take none. A model built with other
    ``image_size`` or ``kwargs`` has other weights, so a checkpoint is rebuilt with the ones it was trained with.
    """
    hw = None if image_size is None else image_hw(image_size)
    kwargs = dict(kwargs or {})
    backbone, source = build_backbone(name, source, pretrained=pretrained, weights=weights, image_size=hw,
                                      kwargs=kwargs)
    measure = hw or natural_size(backbone, source)
    if hw is not None:
        _check_patch_grid(backbone, name, hw)
    student = Student(backbone, num_classes, name, image_size=measure)
    student.head_name = head_path(backbone, source)
    if hw is not None:
        student.input_size = (3, *hw)
    return student
