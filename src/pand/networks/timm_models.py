"""timm networks as backbones (``num_classes=0``): built for the run's input size where they take ``img_size``, pretrained
weights from Hugging Face hub or torch hub (refused at once offline when not cached) or from a local file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError
from pand.networks.hub import (
    hf_cache_dir,
    hf_cached,
    hub_file_names,
    hub_offline,
    is_network_error,
    offline_refusal,
    torch_hub_checkpoint,
    unreachable_refusal,
)
from pand.networks.sizes import patch_size
from pand.networks.weights import load_weights_file


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
    :mod:`pand.networks.hub`), before timm asks Hugging Face hub or torch hub for them."""
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
        raise WeightsUnavailableError(offline_refusal(
            f"the pretrained weights of timm model {name!r} ({tag}, from {source}) are not in the local cache "
            f"{folder} (looked for {', '.join(names)})", local,
        ))


def _timm_download_failed(name: str, local: str, err: Exception) -> WeightsUnavailableError:
    tag, source, folder, _ = _timm_weights_source(name)
    what = f"timm model {name!r} ({tag}{', from ' + source if source else ''})"
    if hub_offline():
        return WeightsUnavailableError(offline_refusal(
            f"the pretrained weights of {what} are not in the local cache {folder or '(timm default)'}", local, err
        ))
    if is_network_error(err):
        return WeightsUnavailableError(unreachable_refusal(
            f"could not download the pretrained weights of {what} into {folder or 'the cache'}", local, err
        ))
    return WeightsUnavailableError(f"could not download the pretrained weights of {what} ({err}). Offline, {local}")


def create_timm_sized(name: str, *, pretrained: bool, num_classes: int, image_size: Any,
                      kwargs: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` built for ``image_size`` (a side or ``(H, W)``; ``None``: the model's default) where the
    model takes ``img_size`` (ViTs, Mixers, Swins), and the keyword arguments that built it (``img_size`` included
    where it was taken), so that an export can write down the call that rebuilds it."""
    import timm

    if image_size is not None and "img_size" not in kwargs:
        sized = {**kwargs, "img_size": image_size}
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **sized), sized
        except TypeError as err:
            # CNNs have no img_size; the constructor refuses it before building anything, so retrying is cheap.
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs), dict(kwargs)


def create_timm(name: str, download: bool, image_size: tuple[int, int] | None, kwargs: Mapping[str, Any]):
    """A timm backbone (no classifier) built for ``image_size`` where the model takes ``img_size``."""
    return create_timm_sized(name, pretrained=download, num_classes=0, image_size=image_size, kwargs=kwargs)[0]


def timm_backbone(
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
        model = create_timm(name, download, image_size, kwargs)
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


def timm_head_name(model: nn.Module) -> str | tuple[str, ...] | None:
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


def timm_default_hw(model: nn.Module) -> tuple[int, int] | None:
    # A patch model built without img_size runs at its pretrained input size, often only at that one; CNNs keep the
    # cheap 64-px measurement.
    if patch_size(model) is None:
        return None
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None
