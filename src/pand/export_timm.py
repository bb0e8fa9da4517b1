"""``pand export format=timm``: a closed-set student as a folder that timm's own factory loads.

The folder holds what timm's ``local-dir:`` source reads (``timm.models._hub.load_model_config_from_path`` and
``load_state_dict_from_path``): ``config.json`` (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
``model_args``, ``pretrained_cfg``) and the weights as ``model.safetensors`` (the first name timm looks for in the
folder); ``student.json`` lies beside them. Then, without pand::

    model = timm.create_model("local-dir:DIR", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    model.pretrained_cfg["label_names"]  # the run's class names, in logit order

What timm can build on its own decides what is exported:

* a timm student is its own architecture (without a pretrained tag), built with its ``student.kwargs`` and, for a
  model whose constructor takes one (ViT, Mixer, Swin), the run's ``img_size``: both go into ``model_args``, which
  timm's factory passes back to the constructor. Its weights keep timm's names (``backbone.X`` -> ``X``, the
  classifier under timm's own ``classifier``). pand's ``pand_*`` models are registered in timm by pand itself, so timm
  alone cannot build them; refused.
* a torchvision student goes out as its timm twin (:mod:`pand.networks.timm_twins`): ResNets, ResNeXts, Wide ResNets
  and DenseNets under the same keys, ``mobilenet_v2`` as ``mobilenetv2_100`` with its tensors renamed in order.
  Other torchvision models, and ``student.kwargs`` that change the network, have no timm twin; refused.
* pand's CIFAR networks (3x3 stem, no max-pool) are in neither library; refused. An open-vocabulary student scores
  images against a text vocabulary, not with a classifier; it goes out as ``format=open_clip``.

``pretrained_cfg`` carries the run's evaluation preprocessing: ``input_size`` ``[3, S, S]``, the run's mean and std,
bilinear resampling and ``crop_pct = image_size / resize_size`` with ``crop_mode: center``, so that timm's eval
transform (resize the short side to ``floor(S / crop_pct)``, centre crop ``S``) has pand's geometry.

Before anything is written, the folder is assembled in a temporary folder next to the output, built from there by
``timm.create_model("local-dir:...", pretrained=True)`` and its logits on a random batch at the run's image size
compared with the student's; a difference above 1e-5 (relative to the largest logit, where that is above 1) refuses
the export, and nothing is written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pand.deploy import preprocessing
from pand.errors import ConfigError, PandError
from pand.io import atomic_write_with
from pand.networks.backbones import resolve_source
from pand.networks.timm_models import create_timm_sized, timm_head_name
from pand.networks.timm_twins import TORCHVISION_IN_TIMM, TORCHVISION_RENAMED_IN_TIMM, timm_state_dict, timm_twin

log = logging.getLogger("pand")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOGIT_ATOL = 1e-5

#: torchvision student.kwargs that change how a network is initialised or trained, not what it computes in eval mode.
EVAL_NEUTRAL_TORCHVISION_KWARGS = ("dropout", "zero_init_residual")
#: pretrained_cfg entries of timm's own config for the architecture that describe the network, not its weights.
_ARCHITECTURE_CFG = ("fixed_input_size", "first_conv", "pool_size")

_CHECK_IMAGES = 3
_OTHER_FORMATS = "export format=onnx, torch_export or safetensors instead"


def _refusal(reason: str) -> ConfigError:
    return ConfigError(f"format=timm cannot express this student: {reason}; nothing was written")


def _source(config: Mapping[str, Any]) -> str:
    return resolve_source(config["student"]["name"], config["student"].get("source", "auto"))


# -- what timm builds ----------------------------------------------------------------------------------------------
def timm_architecture(model: nn.Module, config: Mapping[str, Any]) -> tuple[str, str]:
    """The timm model the student is, and where that comes from. Raises :class:`ConfigError` naming the reason and
    the format to use instead when timm alone cannot build it."""
    if hasattr(model, "vocabulary"):
        raise _refusal("it is an open-vocabulary student, which scores images against a text vocabulary through a "
                       "projection into its teacher's embedding space, not with a classifier a timm model can hold; "
                       "export it with format=open_clip (a folder open_clip loads, text tower included), or as "
                       "format=onnx or torch_export with its vocabulary fixed")
    student = config["student"]
    name, source = student["name"], _source(config)
    kwargs = dict(student.get("kwargs") or {})
    if source == "cifar":
        raise _refusal(f"{name!r} is one of pand's CIFAR networks (3x3 stem, no max-pool), which timm does not have; "
                       f"{_OTHER_FORMATS} (safetensors loads into pand.students.cifar.create_cifar_model)")
    if source == "torchvision":
        twin = timm_twin(name)
        if twin is None:
            twins = [*TORCHVISION_IN_TIMM, *TORCHVISION_RENAMED_IN_TIMM]
            raise _refusal(f"timm has no model with the weights and computation of torchvision {name!r} (torchvision "
                           f"students that have one: {', '.join(twins)}); {_OTHER_FORMATS} (safetensors loads into "
                           f"torchvision.models.get_model({name!r}))")
        changed = sorted(set(kwargs) - set(EVAL_NEUTRAL_TORCHVISION_KWARGS))
        if changed:
            raise _refusal(f"torchvision student.kwargs {', '.join(changed)} change the network, and timm's "
                           f"{twin!r} is the twin of torchvision's default {name!r} only; {_OTHER_FORMATS}")
        how = "same keys" if name in TORCHVISION_IN_TIMM else "same tensors in the same order, renamed"
        return twin, f"torchvision {name} as timm {twin} ({how}, same computation)"
    if source == "timm":
        import timm

        if name.startswith("pand_"):
            raise _refusal(f"{name!r} is registered in timm by pand itself, so timm alone cannot build it; "
                           f"{_OTHER_FORMATS} (safetensors loads into timm after `import pand.students`)")
        architecture = timm.models.split_model_name_tag(name)[0]
        return architecture, f"timm {architecture}"
    raise _refusal(f"unknown student source {source!r}")


def _model_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """The timm student's ``student.kwargs`` (none for a torchvision twin, whose allowed kwargs do not build it)."""
    if _source(config) != "timm":
        return {}
    kwargs = dict(config["student"].get("kwargs") or {})
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as err:
        raise _refusal(f"student.kwargs {kwargs} cannot be written into timm's config.json ({err})") from err
    return kwargs


def reference_model(architecture: str, num_classes: int, image_size: int,
                    kwargs: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """timm's ``architecture`` with random weights, built as the student was (for the run's ``img_size`` where its
    constructor takes one: :func:`pand.networks.timm_models.create_timm_sized`), and the ``model_args`` that
    rebuild it."""
    with torch.random.fork_rng(devices=[]):  # timm initialises at random; the caller's random stream is left alone
        return create_timm_sized(architecture, pretrained=False, num_classes=num_classes, image_size=image_size,
                                 kwargs=kwargs)


# -- config.json ---------------------------------------------------------------------------------------------------
def crop_pct(image_size: int, resize_size: int) -> float:
    """``image_size / resize_size``, nudged down where float rounding would make timm's ``floor(image_size /
    crop_pct)`` resize to one pixel less than pand."""
    pct = image_size / resize_size
    while math.floor(image_size / pct) < resize_size:
        pct = math.nextafter(pct, 0.0)
    return pct


def timm_config(reference: nn.Module, architecture: str, model_args: Mapping[str, Any], names: Sequence[str],
                config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` for the student: the architecture, how to build it, its classes and pand's eval
    preprocessing."""
    pp = preprocessing(config)
    side = pp["image_size"]
    default = dict(getattr(reference, "pretrained_cfg", None) or {})
    cfg: dict[str, Any] = {k: default[k] for k in _ARCHITECTURE_CFG if k in default}
    if "pool_size" in cfg and tuple((default.get("input_size") or (3, 0, 0))[1:]) != (side, side):
        cfg["pool_size"] = None  # timm's pool size is for its default input size, not the run's
    head = timm_head_name(reference)
    cfg.update({
        "input_size": [3, side, side],
        "interpolation": "bilinear",
        "crop_pct": crop_pct(side, pp["resize_size"]),
        "crop_mode": "center",
        "mean": list(pp["mean"]),
        "std": list(pp["std"]),
        "num_classes": len(names),
        "classifier": list(head) if isinstance(head, tuple) else head,
    })
    return {"architecture": architecture, "num_classes": len(names),
            "num_features": int(getattr(reference, "num_features", 0)) or None, "label_names": list(names),
            "model_args": dict(model_args), "pretrained_cfg": cfg}


# -- the check -----------------------------------------------------------------------------------------------------
def _check(folder: Path, model: nn.Module, names: Sequence[str], written: Mapping[str, Any],
           out: Path) -> dict[str, Any]:
    """Build the folder with timm's own factory and compare its logits with the student's; raises on a difference,
    on other classes or on preprocessing timm reads back otherwise than it was written (``out``: named in the
    error, which leaves it untouched)."""
    import timm
    from timm.data import resolve_data_config

    where = f"local-dir:{folder}"
    with torch.random.fork_rng(devices=[]):  # timm initialises the model at random before loading the weights
        try:
            built = timm.create_model(where, pretrained=True)
        except Exception as err:  # noqa: BLE001 - whatever timm fails on, the folder would not load
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise PandError(f"timm {timm.__version__} cannot load the folder pand assembled for this student "
                            f"({type(err).__name__}: {first}); nothing was written to {out}") from err
    built.eval()
    labels = list(built.pretrained_cfg.get("label_names") or [])
    if built.num_classes != len(names) or labels != list(names):
        raise PandError(f"timm builds the folder with {built.num_classes} classes named {labels[:5]}, the student has "
                        f"{len(names)} named {list(names)[:5]}; nothing was written to {out}")
    pcfg = written["pretrained_cfg"]
    data = resolve_data_config({}, model=built)
    wanted = {"input_size": tuple(pcfg["input_size"]), "interpolation": pcfg["interpolation"],
              "crop_pct": pcfg["crop_pct"], "crop_mode": pcfg["crop_mode"], "mean": tuple(pcfg["mean"]),
              "std": tuple(pcfg["std"])}
    read = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items() if k in wanted}
    if read != wanted:
        raise PandError(f"timm reads the folder's preprocessing as {read}, pand wrote {wanted}; nothing was written "
                        f"to {out}")
    side = int(pcfg["input_size"][-1])
    images = torch.randn(_CHECK_IMAGES, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(images).float()
        got = built(images).float()
    if got.shape != want.shape:
        raise PandError(f"timm's model gives logits of shape {tuple(got.shape)}, the student {tuple(want.shape)}; "
                        f"nothing was written to {out}")
    diff = float((got - want).abs().max())
    tolerance = LOGIT_ATOL * max(1.0, float(want.abs().max()))
    if not math.isfinite(diff) or diff > tolerance:
        raise PandError(f"timm's model built from the exported folder differs from the student by up to {diff:.3g} "
                        f"in the logits (tolerance {tolerance:.3g}); nothing was written to {out}")
    return {"images": _CHECK_IMAGES, "image_size": side, "classes": len(names), "max_abs_logit_diff": diff,
            "tolerance": tolerance, "label_names_equal": True, "preprocessing_read_back": True,
            "runtime": f"timm {timm.__version__}, torch {torch.__version__}"}


# -- writing -------------------------------------------------------------------------------------------------------
def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def write_timm(model: nn.Module, config: Mapping[str, Any], names: Sequence[str], out: Path,
               library_state: Callable[[nn.Module], dict[str, torch.Tensor]]) -> tuple[list[Path], dict[str, Any]]:
    """Assemble, check and write the timm folder of ``model`` into ``out``; returns the files written and the record
    for ``student.json``. ``library_state`` gives the student's weights under its library's key names
    (:func:`pand.export.library_state_dict`, which lies in the layer above). Students timm cannot build alone are
    refused before anything is assembled, and nothing reaches ``out`` unless timm loads the folder and agrees with
    pand."""
    architecture, origin = timm_architecture(model, config)
    side = int(config["data"]["image_size"])
    reference, model_args = reference_model(architecture, len(names), side, _model_args(config))
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    state = library_state(model)
    if _source(config) == "torchvision":
        state = timm_state_dict(config["student"]["name"], state, shapes)
    cfg = timm_config(reference, architecture, model_args, names, config)
    # Staged beside the output (same file system), so the check reads exactly the files that are then written.
    with tempfile.TemporaryDirectory(prefix=".pand-timm-", dir=_existing_ancestor(out)) as tmp:
        staging = Path(tmp)
        (staging / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        check = _check(staging, model, names, cfg, out)
        written = []
        # The config last: a reader that finds the new config finds the new weights beside it.
        for path in (staging / WEIGHTS_NAME, staging / CONFIG_NAME):
            with path.open("rb") as src:
                written.append(atomic_write_with(out / path.name, lambda f, s=src: shutil.copyfileobj(s, f)))
    pct = cfg["pretrained_cfg"]["crop_pct"]
    record = {
        "architecture": architecture, "from": origin, "model_args": model_args, "num_features": cfg["num_features"],
        "classifier": cfg["pretrained_cfg"]["classifier"], "tensors": len(state),
        "keys": "timm's own state-dict keys for the architecture (strictly loaded by timm's factory)",
        "load": f"timm.create_model('local-dir:{out}', pretrained=True)",
        "preprocess": {"crop_pct": pct, "timm_resize_size": math.floor(side / pct),
                       "note": "timm's eval transform (timm.data.create_transform(**timm.data.resolve_data_config({}, "
                               "model=model))) resizes the short side to resize_size and centre-crops image_size, "
                               "bilinear, as pand's does; it resamples a PIL image where pand resamples a uint8 "
                               "tensor, so a pixel may differ by a rounding step"},
        "check": check,
    }
    log.info("format=timm: %s checked against pand (max logit difference %.3g)", out, check["max_abs_logit_diff"])
    return written, {"timm": record}
