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


#: Wrapper keys timm's ``load_state_dict`` does not unwrap: PyTorch's tutorial checkpoints keep the weights here.
_EXTRA_WRAPPER_KEYS = ("model_state_dict",)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    Reading is timm's ``timm.models.load_state_dict``: ``.safetensors`` through safetensors, other files through
    ``torch.load(weights_only=True)``; it unwraps training checkpoints (``{'state_dict': ...}``, ``{'model': ...}``)
    and strips the ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes. pand keeps:

    * ``weights_only=True`` passed explicitly, so a user's file is never unpickled whatever timm's default is (a timm
      whose ``load_state_dict`` has no ``weights_only`` is refused rather than used); timm adds only
      ``argparse.Namespace`` to torch's weights-only allowlist, for its own training checkpoints;
    * ``use_ema=False``: the trained weights themselves, as pand always loaded, not an EMA copy stored beside them;
    * its own messages: a missing file is named (timm raises a bare ``FileNotFoundError``), a file that is not a
      plain state dict is refused with the reason (pickled objects are named; timm's text advises
      ``weights_only=False``, which pand never does), and a checkpoint with no tensors at the top is refused with its
      keys;
    * unwrapping ``model_state_dict``, which timm does not know.

    Key mismatches with the model are reported by the callers, which know which keys (the classifier) they replace.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    import inspect

    import timm
    from timm.models import load_state_dict

    if "weights_only" not in inspect.signature(load_state_dict).parameters:
        raise WeightsUnavailableError(
            f"cannot load {path} safely: timm {timm.__version__} reads weights files without torch.load's "
            "weights_only=True; upgrade timm (pip install -U timm)"
        )
    try:
        state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal to read becomes one clear message
        raise WeightsUnavailableError(
            f"could not load {path} as a plain state dict: {_unreadable_reason(path, err)}. Save the weights with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
        ) from err
    for key in _EXTRA_WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            from timm.models import clean_state_dict

            state = clean_state_dict(state[key])
    # A module's get_extra_state() may be any object; every other entry of a state dict is a tensor.
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    if not_tensors:
        listed = ", ".join(map(repr, not_tensors[:5])) + (", ..." if len(not_tensors) > 5 else "")
        raise WeightsUnavailableError(
            f"{path} is not a plain state dict: its entries {listed} are not tensors (pand unwraps checkpoints that "
            "keep the weights under 'state_dict', 'model' or 'model_state_dict'). Save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    return state


def _unreadable_reason(path: Path, err: Exception) -> str:
    import pickle

    unpickling = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, pickle.UnpicklingError)), None)
    if unpickling is None:
        if isinstance(err, AttributeError) and "items" in str(err):
            return "it holds no dict of tensors"
        return f"it is not a torch.save or .safetensors file, or it is damaged ({type(err).__name__}: {err})"
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint (a plain pickle, or no pickle at all)
        pass
    text = str(unpickling)
    if names or "Unsupported global" in text:
        objects = f" ({', '.join(names[:5])})" if names else ""
        return (f"it holds pickled Python objects{objects} besides tensors, and pand never unpickles objects from a "
                "weights file, since unpickling can run arbitrary code")
    # torch's text: "... WeightsUnpickler error: <the reason>\n\nCheck the documentation ..."
    core = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip() or text
    return (f"torch.load(weights_only=True) cannot read it ({core}): it is not a file written by torch.save, or it "
            "holds pickled Python objects, which pand never unpickles since unpickling can run arbitrary code")


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


def _torchvision_backbone(
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
        from pand.teachers.hub import OFFLINE_SUGGESTION, is_network_error

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
        if unexpected or [k for k in missing if not k.startswith(_TORCHVISION_HEADS)]:
            raise WeightsUnavailableError(
                f"{weights_file} does not fit torchvision {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return _strip_torchvision_head(model, name)


def _torchvision_offline_check(name: str, weights: str, local: str) -> None:
    """With HF_HUB_OFFLINE=1, refuse at once torchvision weights that are not in torch hub's cache
    (see :mod:`pand.teachers.hub`): torchvision would otherwise try to download them."""
    from pand.teachers.hub import hub_offline, torch_hub_checkpoint

    if not hub_offline():
        return
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name)[weights].url
    except Exception:  # noqa: BLE001 - no weights enum: torchvision will say so itself
        return
    target = torch_hub_checkpoint(url)
    if not target.is_file():
        raise WeightsUnavailableError(
            f"the ImageNet weights of student {name!r} ({os.path.basename(url)}, from {url}) are not in the local "
            f"cache {target.parent}, and HF_HUB_OFFLINE=1 forbids downloading them. Offline, either {local}"
        )


def _timm_weights_source(name: str) -> tuple[str, str, Path | None, list[str]]:
    """(tag, where from, local cache folder, file names) of timm's default pretrained weights of ``name``, for messages
    and the offline check. The file names are the ones timm's ``load_state_dict_from_hf`` tries (a ``.safetensors``
    twin, then the configured name) or torch hub's file of a url; the folder is None when timm has no source."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tag or no pretrained cfg: nothing to tell
        cfg = None
    if cfg is None:
        return name, "", None, []
    tag = f"{cfg.architecture}.{cfg.tag}" if getattr(cfg, "tag", None) else name
    from pand.teachers.hub import hf_cache_dir, hub_file_names, torch_hub_checkpoint

    if cfg.file:
        return tag, str(cfg.file), None, []
    if cfg.hf_hub_id:
        filename = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"
        names = hub_file_names(filename, ("pytorch_model.bin", "model.safetensors"), (".bin",))
        return tag, f"hf-hub:{cfg.hf_hub_id}", hf_cache_dir(), names
    if cfg.url:
        return tag, cfg.url, torch_hub_checkpoint(cfg.url).parent, [torch_hub_checkpoint(cfg.url).name]
    return tag, "", None, []


def _timm_offline_check(name: str, local: str, kwargs: Mapping[str, Any]) -> None:
    """With HF_HUB_OFFLINE=1, refuse at once timm weights that are not in the local cache (see
    :mod:`pand.teachers.hub`), before timm asks Hugging Face hub or torch hub for them."""
    from pand.teachers.hub import hf_cached, hub_offline

    if not hub_offline() or {"pretrained_cfg", "pretrained_cfg_overlay"} & set(kwargs):
        return  # online, or the user points timm at other weights (e.g. a local file): timm decides
    tag, source, folder, names = _timm_weights_source(name)
    if folder is None or not names:
        return  # timm knows no download for it: it will say so itself
    if source.startswith("hf-hub:"):
        repo, _, revision = source[len("hf-hub:"):].partition("@")
        cached = hf_cached(repo, names, revision=revision or None) is not None
    else:
        cached = (folder / names[0]).is_file()
    if not cached:
        raise WeightsUnavailableError(
            f"the pretrained weights of timm model {name!r} ({tag}, from {source}) are not in the local cache "
            f"{folder} (looked for {', '.join(names)}), and HF_HUB_OFFLINE=1 forbids downloading them. Offline, "
            f"{local}"
        )


def _timm_download_failed(name: str, local: str, err: Exception) -> WeightsUnavailableError:
    from pand.teachers.hub import OFFLINE_SUGGESTION, hub_offline, is_network_error, root_reason

    tag, source, folder, _ = _timm_weights_source(name)
    what = f"timm model {name!r} ({tag}{', from ' + source if source else ''})"
    if hub_offline():
        return WeightsUnavailableError(
            f"the pretrained weights of {what} are not in the local cache {folder or '(timm default)'}, and "
            f"HF_HUB_OFFLINE=1 forbids downloading them ({root_reason(err)}). Offline, {local}"
        )
    if is_network_error(err):
        return WeightsUnavailableError(
            f"could not download the pretrained weights of {what} into {folder or 'the cache'}: the network cannot "
            f"be reached ({root_reason(err)}). {OFFLINE_SUGGESTION}. Offline, {local}"
        )
    return WeightsUnavailableError(f"could not download the pretrained weights of {what} ({err}). Offline, {local}")


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
    local = "use student.pretrained=false or student.weights=/path/to/weights.safetensors (a local file)"
    if download:
        _timm_offline_check(name, local, kwargs)
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
        raise _timm_download_failed(name, local, err) from err
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
    pretrained: bool | str = True,
    weights: str | None = None,
    image_size: int | Sequence[int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Student:
    """A student by name: ``source`` is ``torchvision``, ``timm``, ``cifar`` or ``auto``.

    ``auto`` takes torchvision if it knows the name, else ``cifar`` for a name that only pand's CIFAR networks have
    (:func:`pand.students.cifar.list_cifar_models`), else timm. ``pretrained`` downloads ImageNet weights (the CIFAR
    networks have none: pass ``pretrained=False`` or ``weights``); for a torchvision model it may also name the weights
(``"IMAGENET1K_V1"``); ``weights`` loads a local checkpoint instead.

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
    if isinstance(pretrained, str) and source != "torchvision":
        raise ConfigError(f"student.pretrained={pretrained!r} names torchvision weights, but {name!r} is a {source} "
                          "model: use true or false (timm models take a tag in the name, e.g. resnet18.a1_in1k)")
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
