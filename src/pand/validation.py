"""Config validation in one place, run before any model or data is loaded.

A setting out of range is refused with the option, its value and what is allowed, instead of passing silently (an
epoch count of -1 that trains forever, a neighbour count of 0 that turns NLRD off) or crashing late in torch. Options
shared by every run are listed here; each method declares the ranges of its own options next to its code
(``Distiller.option_rules``), and says which teacher inputs it reads, so that a setting the method would ignore is
refused too. Output folders are checked for writability up front, so results are never computed and then lost.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pand.errors import ConfigError, close_matches, suggest
from pand.io import check_writable
from pand.teachers.precision import PRECISIONS

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """Allowed values of one option: a number in a range, a choice among values, a boolean, or a list of numbers."""

    kind: str  # "int" | "float" | "choice" | "bool" | "floats" | "ints"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False  # null allowed
    length: int | None = None  # for "floats"
    also: tuple[Any, ...] = ()  # extra literal values allowed (e.g. "auto")

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        else:
            what = {"int": "an integer", "float": "a number", "floats": f"a list of {self.length} numbers",
                    "ints": "a list of integers"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_fmt(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_fmt(self.high)}")
            text = what + (" " + " and ".join(bounds) if bounds else "")
            if self.kind == "floats" and bounds:
                text = f"a list of {self.length} numbers, each " + " and ".join(bounds)
            elif self.kind == "ints" and bounds:
                text = "a list of integers, each " + " and ".join(bounds)
        extras = [repr(a) for a in self.also] + (["null"] if self.optional else [])
        return text + (" (or " + ", ".join(extras) + ")" if extras else "")

    def problem(self, value: Any) -> bool:
        """True if ``value`` is not allowed."""
        if value is None:
            return not self.optional
        if value in self.also and not isinstance(value, bool):
            return False
        if self.kind == "choice":
            return value not in self.choices
        if self.kind == "bool":
            return not isinstance(value, bool)
        if self.kind in ("floats", "ints"):
            return (not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length)
                    or any(self._bad_number(v, integer=self.kind == "ints") for v in value))
        return self._bad_number(value, integer=self.kind == "int")

    def _bad_number(self, value: Any, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if integer and not (isinstance(value, int) or float(value).is_integer()):
            return True
        if not math.isfinite(value):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return True
        return self.high is not None and (value >= self.high if self.high_open else value > self.high)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def integer(low: int | None = None, high: int | None = None, **kw: Any) -> Rule:
    return Rule("int", low=low, high=high, **kw)


def number(low: float | None = None, high: float | None = None, **kw: Any) -> Rule:
    return Rule("float", low=low, high=high, **kw)


def choice(*values: Any, **kw: Any) -> Rule:
    return Rule("choice", choices=tuple(values), **kw)


BOOL = Rule("bool")
NON_NEGATIVE = number(0)
POSITIVE = number(0, low_open=True)
WEIGHT = NON_NEGATIVE
PROBABILITY = number(0, 1)


def lookup(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """The value at dotted ``key`` (list items by index, ``a.0.b``), or ``default`` where there is none."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def check_rules(config: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> list[str]:
    """One message per option of ``config`` that breaks its rule (options absent from the config are skipped)."""
    errors = []
    for key, rule in rules.items():
        value = lookup(config, key)
        if value is _MISSING:
            continue
        if rule.problem(value):
            # a misspelt choice (bf61) gets the closest allowed value
            hint = suggest(value, [str(c) for c in rule.choices]) if rule.kind == "choice" and \
                isinstance(value, str) else ""
            errors.append(f"{prefix}{key}={_show(value)} is not allowed: expected {rule.describe()}{hint}")
    return errors


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


# -- options every training run has ---------------------------------------------------------------------------
_LIMIT = number(0, low_open=True, optional=True)  # a fraction in (0, 1] or a number of batches
# the teacher's precision in `pand features` / `pand prompts` / `pand cache build` (pand.teachers.precision)
PRECISION = choice(*PRECISIONS)
PRECISION_TOLERANCE = POSITIVE

TRAIN_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "test": BOOL,
    "trainer.max_epochs": integer(1),
    "trainer.num_nodes": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": integer(1),
    "trainer.gradient_clip_val": number(0, optional=True),
    "trainer.limit_train_batches": _LIMIT,
    "trainer.limit_val_batches": _LIMIT,
    "trainer.limit_test_batches": _LIMIT,
    "data.batch_size": integer(1),
    "data.num_workers": integer(0),
    "data.image_size": integer(1),
    "data.resize_size": integer(1),
    "data.val_fraction": number(0, 1, high_open=True),
    "data.split_seed": integer(0),
    "data.samples_per_class": integer(0, optional=True),
    "data.unlabelled_limit": integer(1, optional=True),
    "data.labelled_fraction": number(0, 1, low_open=True, high_open=True),
    "data.num_classes": integer(1, optional=True),
    "data.class_split": choice("base_novel", optional=True),
    "data.class_split_seed": integer(0),
    "data.mean": Rule("floats", length=3),
    "data.std": Rule("floats", low=0, low_open=True, length=3),
    "data.verify_images": BOOL,
    "data.augment_on": choice("cpu", "device"),
    "data.augment.min_crop_frac": number(0, 1, low_open=True),
    "data.augment.degrees": number(0, 180),
    "data.augment.blur": BOOL,
    "data.augment.blur_sigma": Rule("floats", low=0, low_open=True, length=2),
    "data.augment.blur_kernel": integer(1, optional=True),  # odd, and small enough for the image: _image_size_errors
    "data.augment.brightness": NON_NEGATIVE,
    "data.augment.contrast": NON_NEGATIVE,
    "data.augment.saturation": NON_NEGATIVE,
    "data.augment.hue": number(0, 0.5),
    "data.augment.flip_p": PROBABILITY,
    "optim.lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": number(0, 1, high_open=True),
    "scheduler.interval": choice("epoch", "step"),
    "scheduler.warmup_epochs": integer(0),
    "scheduler.milestones": Rule("ints", low=1),
    "scheduler.step_size": integer(1),
    "scheduler.gamma": POSITIVE,
    "scheduler.T_max": integer(1, optional=True),
    "scheduler.t_initial": integer(1, optional=True),
    "scheduler.eta_min": NON_NEGATIVE,
    "scheduler.lr_min": NON_NEGATIVE,
    "callbacks.ema.decay": number(0, 1, low_open=True, high_open=True),
    "callbacks.early_stopping.patience": integer(0),
    "teacher.logit_scale": number(0, low_open=True, optional=True, also=("learned",)),
    "mixing.mixup_alpha": NON_NEGATIVE,
    "mixing.cutmix_alpha": NON_NEGATIVE,
    "mixing.prob": PROBABILITY,
    "mixing.switch_prob": PROBABILITY,
    "mixing.label_smoothing": number(0, 1, high_open=True),
    "cache.views": integer(0),
    "cache.seed": integer(0),
    "cache.batch_size": integer(1),
    "cache.num_workers": integer(0),
    "cache.topk": integer(1, optional=True),
    "cache.rebuild": BOOL,
    "cache.precision": PRECISION,
    "cache.precision_tolerance": PRECISION_TOLERANCE,
    "checkpoint.every_n_steps": integer(0, optional=True),
    "checkpoint.allow_older": BOOL,
}

# `pand features` / `pand prompts` (PAND stage 1): the `features` and `prompts` sections of the train config.
COOP_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "features.batch_size": integer(1),
    "features.num_workers": integer(0),
    "features.rebuild": BOOL,
    "features.precision": PRECISION,
    "features.precision_tolerance": PRECISION_TOLERANCE,
    "prompts.n_ctx": integer(1),
    "prompts.csc": BOOL,
    "prompts.class_token_position": choice("end", "middle", "front"),
    "prompts.epochs": integer(1),
    "prompts.batch_size": integer(1),
    "prompts.lr": POSITIVE,
    "prompts.momentum": number(0, 1, high_open=True),
    "prompts.weight_decay": NON_NEGATIVE,
    "prompts.warmup_epochs": integer(0),
    "prompts.warmup_lr": NON_NEGATIVE,
    "prompts.logit_scale": number(0, low_open=True, optional=True, also=("learned",)),
    "prompts.precision": PRECISION,
    "prompts.precision_tolerance": PRECISION_TOLERANCE,
    "data.val_fraction": number(0, 1, high_open=True),
    "data.samples_per_class": integer(1, optional=True),
    "data.image_size": integer(1),
    "data.resize_size": integer(1),
}


def _raise(errors: Sequence[str], what: str) -> None:
    # one problem fits on the `pand COMMAND: error: ...` line; several are listed one per line under it
    if len(errors) == 1:
        raise ConfigError(f"invalid {what} setting: {errors[0]}")
    if errors:
        raise ConfigError(f"{len(errors)} invalid {what} settings:\n  " + "\n  ".join(errors))


def _data_errors(config: Mapping[str, Any]) -> list[str]:
    errors = []
    data = config.get("data") or {}
    image, resize = data.get("image_size"), data.get("resize_size")
    if isinstance(image, int) and isinstance(resize, int) and resize < image:
        errors.append(f"data.resize_size={resize} is smaller than data.image_size={image}: the crop cannot fit")
    templates = data.get("templates", _MISSING)
    if templates is not _MISSING:
        if not isinstance(templates, (list, tuple)) or not templates:
            errors.append(f"data.templates={_show(templates)} is not allowed: expected a non-empty list of prompts")
        else:
            errors.extend(f"data.templates[{i}]={t!r} has no '{{}}' where the class name goes"
                          for i, t in enumerate(templates) if not isinstance(t, str) or "{}" not in t)
    allow = data.get("allow_overlap", _MISSING)
    if allow is not _MISSING and not isinstance(allow, bool):
        errors.append(f"data.allow_overlap={_show(allow)} is not allowed: expected true or false (true: run although "
                      "a val or test image is also a training image, and record it in the run summary)")
    return errors


def _teacher_errors(config: Mapping[str, Any], cls) -> list[str]:
    """What the method reads against what the configured teacher side provides, and settings it would ignore."""
    from pand.engine.teacher_side import TEACHER_KINDS, teacher_kind, teacher_provides
    from pand.teachers import LOGITS, STAGE_FEATURES

    errors: list[str] = []
    kind = teacher_kind(config)
    if kind not in TEACHER_KINDS:
        return [f"teacher.kind={_show(kind)} is not allowed: expected one of {', '.join(map(repr, TEACHER_KINDS))}"]
    reads = cls.requires_for(config.get("method") or {})
    uses_teacher = bool(reads) or cls.needs_text_embeds or cls.needs_teacher_model
    missing = reads - teacher_provides(config)
    if missing:
        errors.append(f"method {cls.name!r} reads {sorted(missing)}, which a {kind} teacher does not provide "
                      f"(it provides {sorted(teacher_provides(config))}); use a CLIP teacher or another method")
    reads_text = cls.reads_text_features(config.get("method") or {}) or (LOGITS in reads and kind == "clip")
    text_features = lookup(config, "teacher.text_features")
    if text_features not in (None, _MISSING) and not reads_text:
        errors.append(f"teacher.text_features={text_features} is set, but method {cls.name!r} with these options "
                      f"and a {kind} teacher does not read learned text features; remove it (or choose a method "
                      "that uses them)")
    cache_dir = lookup(config, "cache.dir")
    if cache_dir not in (None, _MISSING) and not reads:
        errors.append(f"cache.dir={cache_dir} is set, but method {cls.name!r} reads no teacher outputs; remove it")
    elif cache_dir not in (None, _MISSING) and kind != "classifier" and \
            lookup(config, "cache.topk") not in (None, _MISSING):
        errors.append(f"cache.topk={lookup(config, 'cache.topk')} is set, but a {kind} teacher's cache stores image "
                      "embeddings, not logits; remove it")
    precision = lookup(config, "cache.precision")
    if cache_dir in (None, _MISSING) and precision not in (None, _MISSING, "fp32"):
        errors.append(f"cache.precision={precision} is set, but no teacher cache is used (cache.dir is unset), and the "
                      "live teacher runs in fp32; remove it, or set cache.dir")
    if cache_dir not in (None, _MISSING) and cls.needs_teacher_model:
        errors.append(f"cache.dir={cache_dir} is set, but method {cls.name!r} trains modules inside the teacher, so "
                      "the teacher runs live every step; remove cache.dir")
    elif cache_dir not in (None, _MISSING) and STAGE_FEATURES in reads:
        errors.append(f"cache.dir={cache_dir} is set, but method {cls.name!r} reads the teacher's stage features, "
                      "which a teacher cache does not store (they are too large per view); remove cache.dir")
    if kind == "classifier" and uses_teacher:
        t = config.get("teacher") or {}
        given = [k for k in ("ckpt", "weights", "pretrained") if t.get(k)]
        if len(given) != 1:
            errors.append("a classifier teacher needs exactly one of teacher.ckpt (a pand checkpoint), "
                          f"teacher.weights (a state dict of teacher.model) or teacher.pretrained=random; got "
                          f"{given or 'none'}")
    return errors


def _unlabelled_errors(config: Mapping[str, Any], cls: Any) -> list[str]:
    """Settings that do not go with unlabelled training images (``data.unlabelled``) or a label-free run."""
    from pand.data.unlabelled import check_unlabelled_setting

    data = config.get("data") or {}
    k = data.get("samples_per_class")
    try:
        source = check_unlabelled_setting(data.get("unlabelled"), k)
    except ConfigError as err:
        return [str(err)]
    free = isinstance(k, int) and not isinstance(k, bool) and k == 0
    if source is None and not free:
        return []
    errors = []
    if source not in (None, "rest") and Path(source).expanduser().is_dir():
        from pand.data.walk import check_input_root

        try:  # a folder pand wrote: refused here, before anything heavy loads
            check_input_root(source, "data.unlabelled")
        except ConfigError as err:
            errors.append(str(err))
    what = "data.samples_per_class=0 (no labelled image)" if free else f"data.unlabelled={source}"
    if not (cls.requires_for(config.get("method") or {}) or cls.needs_text_embeds or cls.needs_teacher_model):
        errors.append(f"{what} with method {cls.name!r}, which learns from labels alone: unlabelled images need a "
                      "method with teacher terms (kd, dkd, vl2lite, pand, openvocab, ...)")
    from pand.engine.mixing import mixing_enabled

    if mixing_enabled(config.get("mixing")):
        errors.append(f"{what} with Mixup/CutMix (mixing.*): mixed pairs would blend labelled with unlabelled images "
                      "and their labels; set mixing.mixup_alpha=0 and mixing.cutmix_alpha=0")
    if data.get("class_split") not in (None, _MISSING):
        errors.append(f"{what} with data.class_split={data.get('class_split')}: unlabelled training images may show the "
                      "classes held out as unseen, which the base-to-novel protocol never trains on")
    return errors


# The Python package each optional logger needs, and the pand extra that installs it.
_LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
}


def _engine_setting_errors(config: Mapping[str, Any]) -> list[str]:
    """Trainer keys pand owns, optional loggers whose package is missing, a warm-up as long as the run."""
    import importlib.util

    from pand.config import PAND_TRAINER_ARGS

    # compose() refuses these in overrides and config files; a config built in Python reaches this check instead
    errors = [f"trainer.{key} is set by pand: {where()}" for key, where in PAND_TRAINER_ARGS.items()
              if (config.get("trainer") or {}).get(key) is not None]
    for name, spec in (config.get("logger") or {}).items():
        target = str((spec or {}).get("_target_") if isinstance(spec, Mapping) else "")
        for cls, (modules, extra) in _LOGGER_PACKAGES.items():
            if target.endswith("." + cls) and not any(importlib.util.find_spec(m) for m in modules):
                errors.append(f"logger {name} ({cls}) needs the {modules[0]} package: pip install 'pand[{extra}]'")
    warmup, epochs = lookup(config, "scheduler.warmup_epochs"), lookup(config, "trainer.max_epochs")
    if isinstance(warmup, int) and isinstance(epochs, int) and 0 < epochs <= warmup:
        errors.append(f"scheduler.warmup_epochs={warmup} is not below trainer.max_epochs={epochs}: training would "
                      "end inside the warm-up")
    return errors


def _image_size_errors(config: Mapping[str, Any]) -> list[str]:
    """Image sizes the training views cannot be made at. The crops and the student work down to 1 pixel; the Gaussian
    blur does not: it pads each side by half its (odd) kernel with reflection, which needs more pixels than the padding
    (pand.data.transforms, on the CPU and on the device alike). Its default kernel, about a tenth of the size and at
    least 3, pads 1 pixel at small sizes and about a twentieth of the size at large ones, so only a 1-pixel image is
    too small for it."""
    image, kernel = lookup(config, "data.image_size"), lookup(config, "data.augment.blur_kernel", None)
    blur = lookup(config, "data.augment.blur", True)
    if TRAIN_RULES["data.image_size"].problem(image):
        return []  # reported by its rule
    image = int(image)
    if kernel is not None and not TRAIN_RULES["data.augment.blur_kernel"].problem(kernel):
        kernel = int(kernel)
        if kernel % 2 == 0:
            return [f"data.augment.blur_kernel={kernel} is not allowed: expected an odd number of pixels (the kernel "
                    "is centred on each pixel), or null for the default"]
        # AugmentConfig refuses such a kernel even with the blur off
        if kernel // 2 >= image:
            return [f"data.augment.blur_kernel={kernel} is too large for data.image_size={image}: the blur pads "
                    f"{kernel // 2} pixels on each side by reflection, which needs data.image_size >= "
                    f"{kernel // 2 + 1}; use a kernel of at most {2 * image - 1} (or null)"]
    elif kernel is None and blur is True and image < 2:
        return [f"data.image_size={image} is too small for the blur of the training views (data.augment.blur=true): "
                "its smallest kernel, 3 pixels, pads 1 pixel on each side by reflection, which needs "
                "data.image_size >= 2; use data.image_size >= 2 or data.augment.blur=false"]
    return []


def _settings_errors(config: Mapping[str, Any]) -> list[str]:
    """The checks that need no model code (plain values and their ranges); see :func:`validate_train_settings`."""
    return (check_rules(config, TRAIN_RULES) + _data_errors(config) + _image_size_errors(config)
            + _engine_setting_errors(config))


def validate_train_settings(config: Mapping[str, Any]) -> None:
    """The part of :func:`validate_train_config` that imports nothing heavy (no torch, no Lightning), so that the
    command line refuses a value out of range in a fraction of a second, before it loads the engine."""
    _raise(_settings_errors(config), "training")


def validate_train_config(config: Mapping[str, Any], *, for_cache_build: bool = False) -> None:
    """Refuse a training (or ``pand cache build``) config with any invalid, inconsistent or ignored setting."""
    from pand.distillers import get_distiller_class

    errors = _settings_errors(config)
    cache = config.get("cache") or {}
    if cache.get("dir") and cache.get("views") == 0:
        errors.append("cache.views=0 with cache.dir set: a teacher cache needs at least 1 view (cache.views >= 1), "
                      "or unset cache.dir to run the teacher online")
    if cache.get("dir") and not for_cache_build:
        from pand.engine.mixing import mixing_enabled

        if mixing_enabled(config.get("mixing")):
            errors.append(f"cache.dir={cache['dir']} is set together with Mixup/CutMix (mixing.*): the cache holds the "
                          "teacher's outputs of unmixed views, not of the mixed images; remove cache.dir (the teacher "
                          "then runs on the mixed batch) or set mixing.mixup_alpha=0 and mixing.cutmix_alpha=0")
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices")
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        errors.append(f"trainer.devices={_show(devices)} is not allowed: expected a count >= 1, -1 (all), 'auto' "
                      "or a list of device ids")
    if not for_cache_build:
        from pand.engine.builders import target_errors

        errors += target_errors(config)
        method = config.get("method") or {}
        cls = get_distiller_class(method.get("name"))
        from pand.distillers.registry import method_options

        unknown = sorted(set(method) - {"name"} - method_options(cls))
        if unknown:
            errors.append(f"method {cls.name!r} has no option(s) {unknown}; its options are "
                          f"{sorted(method_options(cls))}")
        errors += check_rules(method, cls.option_rules, prefix="method.")
        if lookup(config, "data.class_split") not in (None, _MISSING) and not cls.embeds_images:
            errors.append(f"data.class_split={lookup(config, 'data.class_split')} tests on classes the student never "
                          f"trained on, which only an open-vocabulary student can classify; method {cls.name!r} "
                          "learns a fixed classifier (use method=openvocab, or remove data.class_split)")
        errors += cls.check_config(config)
        errors += _teacher_errors(config, cls)
        errors += _unlabelled_errors(config, cls)
    _raise(errors, "training")
    run_dir = config.get("run_dir") or lookup(config, "paths.runs_dir")
    if not for_cache_build and run_dir not in (None, _MISSING):
        check_writable(run_dir, "the run folder")
    if cache.get("dir") and not (Path(cache["dir"]) / "meta.json").is_file():
        check_writable(cache["dir"], "the teacher cache folder (cache.dir)")


def validate_coop_config(config: Mapping[str, Any], *, writes_prompts: bool) -> None:
    """Refuse a ``pand features`` / ``pand prompts`` config with an invalid setting or unwritable output."""
    errors = check_rules(config, COOP_RULES) + _data_errors(config)
    splits = lookup(config, "features.splits")
    if splits is not _MISSING and (not splits or any(s not in ("train", "val", "test") for s in splits)):
        errors.append(f"features.splits={_show(splits)} is not allowed: expected a non-empty list of train, val, test")
    device = lookup(config, "features.device")
    if device not in (_MISSING, None) and not (isinstance(device, str) and (
            device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()))):
        errors.append(f"features.device={_show(device)} is not allowed: expected auto, cpu, cuda, cuda:N or mps")
    _raise(errors, "stage-1")
    check_writable(config["features"]["dir"], "the features folder (features.dir)")
    if writes_prompts:
        check_writable(Path(config["prompts"]["out"]).parent, "the output folder of prompts.out=")


# -- options of pand eval, predict and export ---------------------------------------------------------------------
# Checked before torch is imported, except that a GPU device needs torch to ask whether this machine has one.

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def device_errors(key: str, value: Any) -> list[str]:
    """``auto`` or ``cpu``; ``cuda``, ``cuda:N`` or ``mps`` where this machine has that device."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        # a stricter match than suggest(): tpu or gpu are not typos of cpu
        match = close_matches(value, ["auto", "cpu", "cuda", "mps"], cutoff=0.75, limit=1) \
            if isinstance(value, str) else []
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        return [f"{key}={_show(value)} is not allowed: expected {DEVICES}{hint}"]
    if value in ("auto", "cpu"):
        return []
    import torch

    instead = f"use {key}=cpu or {key}=auto"
    if value == "mps":
        if torch.backends.mps.is_available():
            return []
        return [f"{key}={_show(value)} is not available: torch finds no Apple GPU (MPS) on this machine; {instead}"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (f"torch {torch.__version__} is a build without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} finds none")
        return [f"{key}={_show(value)} is not available: this machine has no CUDA GPU ({why}); {instead}"]
    index = int(value.partition(":")[2] or 0)
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        return [f"{key}={_show(value)} is not available: this machine has {count} CUDA device(s), {have}"]
    return []


def _as_path(key: str, value: Any) -> tuple[Path | None, list[str]]:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        return None, [f"{key}={_show(value)} is not allowed: expected a path"]
    return Path(value).expanduser(), []


def input_file_errors(key: str, value: Any, what: str) -> list[str]:
    """A file the command reads: it exists, is a file and can be read."""
    path, errors = _as_path(key, value)
    if errors:
        return errors
    shown = _show(os.fspath(value))
    if path.is_dir():
        return [f"{key}={shown} is a folder; expected {what}"]
    if not path.is_file():
        return [f"{key}={shown}: no such file; expected {what}"]
    if not os.access(path, os.R_OK):
        return [f"{key}={shown} cannot be read: permission denied"]
    return []


def output_file_errors(key: str, value: Any, suffixes: Sequence[str]) -> list[str]:
    """A file the command writes, of the format its suffix names; its folder is checked by :func:`check_writable`."""
    path, errors = _as_path(key, value)
    if errors:
        return errors
    shown, allowed = _show(os.fspath(value)), " or ".join(suffixes)
    if path.is_dir():
        # the write would replace a folder, found only when the results are ready
        return [f"{key}={shown} is a folder; expected a file name ending in {allowed}"]
    if path.suffix.lower() not in suffixes:
        return [f"{key}={shown} is not allowed: the file name must end in {allowed}"]
    return []


def output_folder_errors(key: str, value: Any) -> list[str]:
    path, errors = _as_path(key, value)
    if errors:
        return errors
    if path.exists() and not path.is_dir():
        return [f"{key}={_show(os.fspath(value))} is a file; expected a folder (created if missing)"]
    return []


def images_errors(key: str, value: Any) -> list[str]:
    """An image file, a folder or a glob pattern that matches something (which of them are images is for later)."""
    path, errors = _as_path(key, value)
    if errors or path.exists():
        return errors
    pattern, shown = str(path), _show(os.fspath(value))
    if any(c in pattern for c in "*?["):
        if next(glob.iglob(pattern, recursive=True), None) is None:
            return [f"{key}={shown}: the pattern matches no file"]
        return []
    return [f"{key}={shown}: no such file or folder"]


def read_class_names(classes: Sequence[str] | str | None, classes_file: str | os.PathLike | None, *,
                     key: str = "classes", file_key: str = "classes_file") -> list[str] | None:
    """Class names from ``classes`` (a list, or one comma-separated string) or a UTF-8 file with one name per line;
    None when neither is given."""
    if classes is not None and classes_file is not None:
        raise ConfigError(f"give {key}=... or {file_key}=..., not both")
    if classes_file is not None:
        path, errors = _as_path(file_key, classes_file)
        errors = errors or input_file_errors(file_key, classes_file, "a text file with one class name per line")
        if errors:
            raise ConfigError(errors[0])
        source = f"{file_key}={_show(os.fspath(classes_file))}"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source} is not UTF-8 text (at byte {err.start})") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif classes is None:
        return None
    elif isinstance(classes, str):
        source = f"{key}={_show(classes)}"
        names = [c.strip() for c in classes.split(",") if c.strip()]
    elif isinstance(classes, (list, tuple)) and all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                                     for c in classes):
        source = f"{key}={_show(list(classes))}"
        names = [str(c).strip() for c in classes if str(c).strip()]
    else:
        raise ConfigError(f"{key}={_show(classes)} is not allowed: expected class names, as {key}=[a,b,c] or "
                          f"{key}=a,b,c")
    if not names:
        raise ConfigError(f"{source}: the list of class names is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: class names must be distinct; repeated: {', '.join(map(repr, duplicates))}")
    return names


def raise_option_errors(errors: Sequence[str]) -> None:
    """As for training settings: one problem on the error line, several listed under it."""
    if len(errors) == 1:
        raise ConfigError(f"invalid option: {errors[0]}")
    if errors:
        raise ConfigError(f"{len(errors)} invalid options:\n  " + "\n  ".join(errors))


PREDICT_RULES: dict[str, Rule] = {
    "topk": integer(1),
    "batch_size": integer(1),
    "num_workers": integer(0),
}
PREDICTION_SUFFIXES = (".csv", ".json")


def validate_predict_options(options: Mapping[str, Any]) -> list[str] | None:
    """Refuse ``pand predict`` options (:func:`pand.predict.predict`'s arguments) before anything is loaded; returns
    the class names given, if any."""
    errors = check_rules(options, PREDICT_RULES)
    errors += input_file_errors("ckpt_path", options.get("ckpt_path"), "a checkpoint file")
    errors += images_errors("images", options.get("images"))
    if options.get("device") is not None:
        errors += device_errors("device", options["device"])
    names = None
    try:
        names = read_class_names(options.get("classes"), options.get("classes_file"))
    except ConfigError as err:
        errors.append(str(err))
    out = options.get("out")
    if out is not None:
        errors += output_file_errors("out", out, PREDICTION_SUFFIXES)
    raise_option_errors(errors)
    if out is not None:
        check_writable(Path(out).expanduser().absolute().parent, "the folder of out=")
    return names


EXPORT_FORMATS = ("onnx", "torch_export", "safetensors")
# what a format needs besides pand's own dependencies (pip install pand[export])
EXPORT_PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}
EXPORT_RULES: dict[str, Rule] = {"format": choice(*EXPORT_FORMATS)}


def _missing_export_packages(fmt: str) -> list[str]:
    import importlib.util

    return [m for m in EXPORT_PACKAGES.get(fmt, ()) if importlib.util.find_spec(m) is None]


def validate_export_options(options: Mapping[str, Any]) -> list[str] | None:
    """Refuse ``pand export`` options before anything is loaded; returns the class names given, if any
    (``class_names=a,b,...``, or the path of a file with one name per line)."""
    errors = check_rules(options, EXPORT_RULES)
    errors += input_file_errors("ckpt_path", options.get("ckpt_path"), "a checkpoint file")
    errors += output_folder_errors("out", options.get("out"))
    fmt = options.get("format")
    missing = [] if errors or fmt not in EXPORT_PACKAGES else _missing_export_packages(fmt)
    if missing:
        errors.append(f"format={fmt} needs {', '.join(EXPORT_PACKAGES[fmt])} (missing: {', '.join(missing)}): "
                      "pip install pand[export]")
    names, given = None, options.get("class_names")
    try:
        # one name that looks like a file's (a folder in it, or .txt) is a file of names, one per line
        if isinstance(given, str) and "," not in given and (
                Path(given).expanduser().is_file() or "/" in given or given.lower().endswith(".txt")):
            names = read_class_names(None, given, file_key="class_names")
        else:
            names = read_class_names(given, None, key="class_names")
    except ConfigError as err:
        errors.append(str(err))
    raise_option_errors(errors)
    check_writable(options["out"], "the export folder (out=)")
    return names


EVAL_SPLITS = ("val", "test")
# sections of a training config: `pand eval data=cub` would replace the checkpoint's whole data section by a string
_SECTIONS = frozenset({k.partition(".")[0] for k in (*TRAIN_RULES, *COOP_RULES) if "." in k}
                      | {"student", "method", "logger", "paths"})


def eval_override_errors(overrides: Mapping[str, Any]) -> list[str]:
    """Overrides of a checkpoint's config in ``pand eval``: single settings, in range where pand knows the range."""
    errors = [f"{key}={_show(value)} would replace the whole {key} section of the checkpoint's config; override "
              f"single settings ({key}.NAME=VALUE) instead" for key, value in overrides.items()
              if key in _SECTIONS and not isinstance(value, Mapping)]
    return errors + check_rules(overrides, TRAIN_RULES)


def validate_eval_options(splits: Any, out: str | os.PathLike | None, *, ckpt_path: Any = _MISSING,
                          overrides: Mapping[str, Any] | None = None) -> None:
    """Refuse ``pand eval`` options before the checkpoint is loaded: the splits, the JSON file of the results, and
    (from the command line) the checkpoint file and the overrides of its config."""
    errors = [] if ckpt_path is _MISSING else input_file_errors("ckpt_path", ckpt_path, "a checkpoint file")
    if not isinstance(splits, (list, tuple)) or not splits or any(s not in EVAL_SPLITS for s in splits):
        shown = _show(list(splits) if isinstance(splits, tuple) else splits)
        errors.append(f"splits={shown} is not allowed: expected a non-empty list of val and/or test, such as "
                      "[val,test] or [test]")
    if out is not None:
        errors += output_file_errors("out", out, (".json",))
    errors += eval_override_errors(overrides or {})
    raise_option_errors(errors)
    if out is not None:
        check_writable(Path(out).expanduser().absolute().parent, "the folder of out=")
