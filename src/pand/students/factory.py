"""Build students by name from torchvision, timm or pand's own CIFAR networks (:mod:`pand.students.cifar`).

Every student is the same shape to the rest of pand: ``features(x)`` gives the pooled feature ``h`` (B x d), the
classifier ``linear_cls`` maps it to logits, and ``feature_dim`` is measured by a forward pass rather than read from
a table, so any torchvision or timm classifier works. The 32-px CIFAR networks of the KD literature (``resnet8x4``,
``resnet32x4``, ``wrn_40_2``, ...), which neither library has, come from source ``cifar``.

ViTs, MLP-Mixers and Swins are built for one input size (224 px in timm's defaults). Given the run's ``image_size``,
:func:`build_student` builds timm models that take ``img_size`` for that size and measures the feature width there,
so the same names serve 32-px CIFAR; a model that cannot run at that size is refused with what to change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

# Attribute names under which torchvision classification models keep their final classifier.
_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")

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
        self.feature_dim = _measure_feature_dim(backbone, name, _hw(image_size or _DEFAULT_MEASURE_SIDE))
        self.linear_cls = nn.Linear(self.feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.linear_cls.out_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_cls(self.features(images))


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"an image size is a positive side or a (height, width) pair, got {size!r}")
    return hw  # type: ignore[return-value]


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size of a patch-embedding model (ViT, Mixer, Swin: timm's ``PatchEmbed``, torchvision's ViT)."""
    for module in model.modules():
        if getattr(module, "dynamic_img_pad", False):
            return None  # timm pads such inputs to whole patches: any size tiles
        p = getattr(module, "patch_size", None)
        if isinstance(p, int) and not isinstance(p, bool):
            return p, p
        if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) for v in p):
            return int(p[0]), int(p[1])
    return None


def _check_patch_grid(model: nn.Module, name: str, hw: tuple[int, int]) -> None:
    # timm's patch embedding is a strided convolution: a size the patch does not divide loses its border silently.
    patch = _patch_size(model)
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


def _torchvision_backbone(
    name: str, pretrained: bool, weights_file: str | None, kwargs: Mapping[str, Any]
) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"{name!r} is not a torchvision classification model")
    weights = "DEFAULT" if pretrained and weights_file is None else None
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (TypeError, ValueError) as err:  # torchvision refuses unknown options and ones that contradict the weights
        raise ConfigError(f"torchvision model {name!r} does not take student.kwargs {dict(kwargs)}: {err}") from err
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


def _create_timm(name: str, download: bool, image_size: tuple[int, int] | None, kwargs: Mapping[str, Any]):
    """``timm.create_model`` built for ``image_size`` where the model takes ``img_size`` (ViTs, Mixers, Swins)."""
    import timm

    if image_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, pretrained=download, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as err:
            # CNNs have no img_size; the constructor refuses it before building anything, so retrying is cheap.
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, pretrained=download, num_classes=0, **kwargs)


def _timm_backbone(
    name: str, pretrained: bool, weights_file: str | None, image_size: tuple[int, int] | None,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    import timm

    if not timm.list_models(name) and not timm.is_model(name):
        raise ConfigError(f"{name!r} is not a timm model name")
    download = pretrained and weights_file is None
    try:
        model = _create_timm(name, download, image_size, kwargs)
    except Exception as err:  # noqa: BLE001 - network failures come in many types
        if isinstance(err, TypeError) and kwargs:
            raise ConfigError(
                f"timm model {name!r} does not take student.kwargs {dict(kwargs)}: {err}. An entry point fixes some "
                f"options itself (mixer_s16_224 its patch_size, for one): choose the variant with the value you want "
                f"or drop the key"
            ) from err
        if "size mismatch" in str(err):
            size = "its default size" if image_size is None else f"{image_size[0]} x {image_size[1]} px"
            raise ConfigError(
                f"the pretrained weights of timm {name!r} do not fit it built for {size} with student.kwargs "
                f"{dict(kwargs)} ({err}); train it from scratch with student.pretrained=false"
            ) from err
        if not download:
            raise ConfigError(f"could not build timm model {name!r} with student.kwargs {dict(kwargs)}: {err}") from err
        raise WeightsUnavailableError(
            f"could not download the pretrained weights of timm model {name!r} ({err}). Offline, use "
            f"student.pretrained=false or student.weights=/path/to/weights.safetensors"
        ) from err
    if weights_file is not None:
        state = {k: v for k, v in load_weights_file(weights_file).items() if not k.startswith(("fc.", "head.fc.", "classifier.", "head."))}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # e.g. position embeddings saved for another input size
            raise WeightsUnavailableError(f"{weights_file} does not fit timm {name}: {err}") from err
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


def _timm_head_name(model: nn.Module) -> str | tuple[str, ...] | None:
    """Where a timm model built with ``num_classes=C`` keeps its classifier: ``pretrained_cfg["classifier"]``, or,
    for models registered without one (pand's ``pand_*``), the path of the module ``get_classifier()`` returns."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(named, str):
        return named
    if isinstance(named, (tuple, list)) and all(isinstance(n, str) for n in named):
        return tuple(named)
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    found = [paths.get(id(h)) for h in heads]
    if not found or None in found:
        return None
    return found[0] if len(found) == 1 else tuple(found)


def _timm_default_hw(model: nn.Module) -> tuple[int, int] | None:
    # A patch model built without img_size runs at its pretrained input size, often only at that one; CNNs keep the
    # cheap 64-px measurement.
    if _patch_size(model) is None:
        return None
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None


def build_student(
    name: str,
    num_classes: int,
    *,
    source: str = "auto",
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | Sequence[int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Student:
    """A student by name: ``source`` is ``torchvision``, ``timm``, ``cifar`` or ``auto``.

    ``auto`` takes torchvision if it knows the name, else ``cifar`` for a name that only pand's CIFAR networks have
    (:func:`pand.students.cifar.list_cifar_models`), else timm. ``pretrained`` downloads ImageNet weights (the CIFAR
    networks have none: pass ``pretrained=False`` or ``weights``); ``weights`` loads a local checkpoint instead.

    ``image_size`` is the run's input side (or ``(H, W)``): timm models whose constructor takes ``img_size`` are built
    for it, the feature width is measured at it and it is kept as ``student.input_size``; a model that cannot run
    at it raises :class:`ConfigError`. Without it, timm models keep their default size, where patch models (ViT,
    Mixer, Swin) are measured; other models are measured at 64 px. ``kwargs`` (``student.kwargs``) go to ``timm.create_model`` or torchvision's
    ``get_model``, e.g. ``{"patch_size": 4, "depth": 6}``; the CIFAR networks take none. A model built with other
    ``image_size`` or ``kwargs`` has other weights, so a checkpoint is rebuilt with the ones it was trained with.
    """
    hw = None if image_size is None else _hw(image_size)
    kwargs = dict(kwargs or {})
    if source == "auto":
        source = _resolve_auto(name)
    if source == "torchvision":
        backbone = _torchvision_backbone(name, pretrained, weights, kwargs)
    elif source == "timm":
        backbone = _timm_backbone(name, pretrained, weights, hw, kwargs)
    elif source == "cifar":
        if kwargs:
            raise ConfigError(f"pand's CIFAR networks take no student.kwargs, got {kwargs}")
        backbone = _cifar_backbone(name, pretrained, weights)
    else:
        raise ConfigError(f"student.source must be torchvision, timm, cifar or auto, got {source!r}")
    measure = hw or (_timm_default_hw(backbone) if source == "timm" else None)
    if hw is not None:
        _check_patch_grid(backbone, name, hw)
    student = Student(backbone, num_classes, name, image_size=measure)
    student.head_name = _timm_head_name(backbone) if source == "timm" else getattr(backbone, "_pand_head_name", None)
    if hw is not None:
        student.input_size = (3, *hw)
    return student
