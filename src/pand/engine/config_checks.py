"""Checks of a composed config, run before any model or data is loaded.

Options shared by every run are listed here; each method declares the ranges of its own options next to its code
(``Distiller.option_rules``, built from :mod:`pand.rules`), and says which teacher inputs it reads, so that a setting
the method would ignore is refused too. Output folders are checked for writability up front, so results are never
computed and then lost.

This module sits above what it checks (methods, engine, data, the config's composition). The checks of plain values
import nothing heavy, so that the command line refuses a value out of range before it loads torch; the checks that
need the methods or the engine import them where they run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pand.config import PAND_TRAINER_ARGS, teacher_cache_settings
from pand.errors import ConfigError
from pand.io import check_writable
from pand.rules import (
    AUGMENT_ON,
    BOOL,
    MISSING,
    NON_NEGATIVE,
    NOVEL_PROTOCOL_SETTINGS,
    POSITIVE,
    PROBABILITY,
    Rule,
    check_rules,
    choice,
    data_setting_errors,
    input_file_errors,
    integer,
    lookup,
    number,
    output_file_errors,
    output_folder_errors,
    raise_option_errors,
    show,
)
from pand.stage1.checks import COOP_RULES
from pand.teachers.outputs import LOGITS, STAGE_FEATURES
from pand.teachers.precision import PRECISION_RULE, TOLERANCE_RULE
from pand.teachers.registry import TeacherKind, get_teacher_kind, kind_of, teacher_kind_names

# -- options every training run has ---------------------------------------------------------------------------
_LIMIT = number(0, low_open=True, optional=True)  # a fraction in (0, 1] or a number of batches

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
    "data.eval_batch_size": integer(1, optional=True),
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
    "data.novel_protocol": choice(*NOVEL_PROTOCOL_SETTINGS),
    "data.mean": Rule("floats", length=3),
    "data.std": Rule("floats", low=0, low_open=True, length=3),
    "data.verify_images": BOOL,
    "data.skip_bad": BOOL,
    "data.augment_on": choice(*AUGMENT_ON),
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
    "cache.shard_size": integer(1, optional=True),
    "cache.storage": choice("float16", "int8"),
    "cache.local_shards": BOOL,
    "cache.rebuild": BOOL,
    "cache.precision": PRECISION_RULE,
    "cache.precision_tolerance": TOLERANCE_RULE,
    "checkpoint.every_n_steps": integer(0, optional=True),
    "checkpoint.allow_older": BOOL,
    "quantize.name": choice("none", "qat"),
    "quantize.start_epoch": integer(0),
    "quantize.freeze_bn_epochs": integer(0),
    "quantize.export": BOOL,
    "quantize.calibration": integer(1),
}



def _dataset_errors(config: Mapping[str, Any]) -> list[str]:
    """Settings that the configured dataset kind itself refuses (a captions dataset's, tar shards')."""
    data = config.get("data") or {}
    from pand.data import captions, shards  # torch comes with the data package: only this full check imports it

    return (captions.setting_errors(data) if data.get("name") == "captions" else []) + shards.setting_errors(data)


def _teacher_errors(config: Mapping[str, Any], cls) -> list[str]:
    """What the method reads against what the configured teacher side provides, and settings it would ignore."""
    errors: list[str] = []
    try:
        kind = kind_of(config)
    except ConfigError as err:
        return [str(err)]
    reads = cls.requires_for(config.get("method") or {})
    uses_teacher = cls.uses_teacher_with(reads)
    missing = reads - kind.provides
    if missing:
        errors.append(f"method {cls.name!r} reads {sorted(missing)}, which a {kind.name} teacher does not provide "
                      f"(it provides {sorted(kind.provides)}); {_providers_hint(missing)}")
    reads_text = cls.reads_text_features(config.get("method") or {}) or (LOGITS in reads and kind.has_text)
    text_features = lookup(config, "teacher.text_features")
    if text_features not in (None, MISSING) and not reads_text:
        errors.append(f"teacher.text_features={text_features} is set, but method {cls.name!r} with these options "
                      f"and a {kind.name} teacher does not read learned text features; remove it (or choose a method "
                      "that uses them)")
    cache_dir = lookup(config, "cache.dir")
    cached = teacher_cache_settings(config) is not None
    if cached:
        errors += cache_refusals(cls, reads, kind, cache_dir)
    if cached and reads and LOGITS not in kind.cached and \
            lookup(config, "cache.topk") not in (None, MISSING):
        errors.append(f"cache.topk={lookup(config, 'cache.topk')} is set, but a {kind.name} teacher's cache stores "
                      f"{', '.join(sorted(kind.cached))}, not logits; remove it")
    if cached and lookup(config, "cache.storage") == "int8" and lookup(config, "cache.topk") not in (None, MISSING):
        errors.append(f"cache.storage=int8 and cache.topk={lookup(config, 'cache.topk')} are both set: top-k logits "
                      "are stored as float16 values with their classes; choose one")
    precision = lookup(config, "cache.precision")
    if not cached and precision not in (None, MISSING, "fp32"):
        errors.append(f"cache.precision={precision} is set, but no teacher cache is used (cache.dir is unset), and the "
                      "live teacher runs in fp32; remove it, or set cache.dir")
    if uses_teacher:
        errors.extend(kind.setting_errors(config.get("teacher") or {}))
    return errors


def _providers_hint(missing: frozenset[str]) -> str:
    """What to do about outputs the configured teacher kind does not provide: the kinds that do, if any."""
    kinds = [name for name in teacher_kind_names() if missing <= get_teacher_kind(name).provides]
    return (f"use a teacher that does ({' or '.join(f'teacher.kind={k}' for k in kinds)}) or another method" if kinds
            else "use another method")


def cache_refusals(cls, reads: frozenset[str], kind: TeacherKind, cache_dir: Any) -> list[str]:
    """Why a teacher cache (``cache.dir``) cannot serve method ``cls`` reading ``reads`` from a ``kind`` teacher;
    empty when it can. Asked by the config checks and again before a cache is opened or built."""
    if not reads:
        return [f"cache.dir={cache_dir} is set, but method {cls.name!r} reads no teacher outputs; remove it"]
    if cls.needs_teacher_model:
        return [f"cache.dir={cache_dir} is set, but method {cls.name!r} trains modules inside the teacher, so the "
                "teacher runs live every step; remove cache.dir"]
    if STAGE_FEATURES in reads:
        return [f"cache.dir={cache_dir} is set, but method {cls.name!r} reads the teacher's stage features, which a "
                "teacher cache does not store (they are too large per view): it needs the live teacher; remove "
                "cache.dir"]
    beyond = reads - kind.served_from_cache
    if beyond:
        return [f"cache.dir={cache_dir} is set, but method {cls.name!r} reads {sorted(beyond)}, which a {kind.name} "
                f"teacher's cache does not hold (it holds {sorted(kind.served_from_cache)}): it needs the live "
                "teacher; remove cache.dir"]
    return []


def _unlabelled_errors(config: Mapping[str, Any], cls: Any) -> list[str]:
    """Settings that do not go with unlabelled training images (``data.unlabelled``) or a label-free run."""
    from pand.data.assembly import label_free
    from pand.data.unlabelled import check_unlabelled_setting

    data = config.get("data") or {}
    k = data.get("samples_per_class")
    try:
        source = check_unlabelled_setting(data.get("unlabelled"), k)
    except ConfigError as err:
        return [str(err)]
    free = label_free(data)
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
    if not cls.uses_teacher_with(cls.requires_for(config.get("method") or {})):
        errors.append(f"{what} with method {cls.name!r}, which learns from labels alone: unlabelled images need a "
                      "method with teacher terms (kd, dkd, vl2lite, pand, openvocab, ...)")
    from pand.data.mixing import mixing_enabled

    if mixing_enabled(config.get("mixing")):
        errors.append(f"{what} with Mixup/CutMix (mixing.*): mixed pairs would blend labelled with unlabelled images "
                      "and their labels; set mixing.mixup_alpha=0 and mixing.cutmix_alpha=0")
    return errors


def _novel_protocol_errors(config: Mapping[str, Any]) -> list[str]:
    """``data.novel_protocol=transductive`` only means something for a base-to-novel run with the unlabelled ``rest``
    of the training split; anywhere else it would be ignored."""
    from pand.data.assembly import novel_protocol

    data = config.get("data") or {}
    if data.get("novel_protocol", "strict") != "transductive":
        return []
    try:
        protocol = novel_protocol(data)
    except ConfigError:
        return []  # refused with its reason by the unlabelled checks
    if protocol is None:
        return ["data.novel_protocol=transductive is set, but there is no class split (data.class_split=base_novel) "
                "whose novel classes it would concern; remove it"]
    if protocol != "transductive":
        shown = "no unlabelled images" if protocol == "strict" else \
            f"data.unlabelled={data.get('unlabelled')}, a folder (a generic corpus)"
        return [f"data.novel_protocol=transductive is set, but with {shown} it chooses nothing: it lets the unlabelled "
                "rest of the training split (data.unlabelled=rest) keep its novel-class images; remove it"]
    return []


# The Python package each optional logger needs, and the pand extra that installs it.
_LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
}


def _engine_setting_errors(config: Mapping[str, Any]) -> list[str]:
    """Trainer keys pand owns, optional loggers whose package is missing, a warm-up as long as the run."""
    import importlib.util

    # compose() refuses these in overrides and config files; a config built in Python reaches this check instead
    errors = [f"trainer.{key} is set by pand: {where()}" for key, where in PAND_TRAINER_ARGS.items()
              if (config.get("trainer") or {}).get(key) is not None]
    for name, spec in (config.get("logger") or {}).items():
        target = str((spec or {}).get("_target_") if isinstance(spec, Mapping) else "")
        for cls, (modules, extra) in _LOGGER_PACKAGES.items():
            if target.endswith("." + cls) and not any(importlib.util.find_spec(m) for m in modules):
                errors.append(f"logger {name} ({cls}) needs the {modules[0]} package: pip install 'pand[{extra}]'")
    errors += _quantize_errors(config)
    warmup, epochs = lookup(config, "scheduler.warmup_epochs"), lookup(config, "trainer.max_epochs")
    if isinstance(warmup, int) and isinstance(epochs, int) and 0 < epochs <= warmup:
        errors.append(f"scheduler.warmup_epochs={warmup} is not below trainer.max_epochs={epochs}: training would "
                      "end inside the warm-up")
    return errors


def _quantize_errors(config: Mapping[str, Any]) -> list[str]:
    """A quantization-aware run that would never train quantized, or starts from a checkpoint that is not there."""
    q = config.get("quantize") or {}
    if q.get("name") != "qat":
        extra = sorted(set(q) - {"name"})
        return [f"quantize.{k} is set but quantize={q.get('name')} does not read it: use quantize=qat" for k in extra]
    errors = []
    start, epochs = q.get("start_epoch", 0), lookup(config, "trainer.max_epochs")
    if isinstance(start, int) and isinstance(epochs, int) and start >= epochs >= 1:
        errors.append(f"quantize.start_epoch={start} is not below trainer.max_epochs={epochs}: no training step "
                      "would run quantized")
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
    return (check_rules(config, TRAIN_RULES) + data_setting_errors(config) + _image_size_errors(config)
            + _engine_setting_errors(config))


def validate_train_settings(config: Mapping[str, Any]) -> None:
    """The part of :func:`validate_train_config` that imports nothing heavy (no torch, no Lightning), so that the
    command line refuses a value out of range in a fraction of a second, before it loads the engine."""
    raise_option_errors(_settings_errors(config), "training setting")


def validate_train_config(config: Mapping[str, Any], *, for_cache_build: bool = False) -> None:
    """Refuse a training (or ``pand cache build``) config with any invalid, inconsistent or ignored setting."""
    from pand.distillers import get_distiller_class

    errors = _settings_errors(config)
    cache = config.get("cache") or {}
    if cache.get("dir") and cache.get("views") == 0:
        errors.append("cache.views=0 with cache.dir set: a teacher cache needs at least 1 view (cache.views >= 1), "
                      "or unset cache.dir to run the teacher online")
    if cache.get("dir") and not for_cache_build:
        from pand.data.mixing import mixing_enabled

        if mixing_enabled(config.get("mixing")):
            errors.append(f"cache.dir={cache['dir']} is set together with Mixup/CutMix (mixing.*): the cache holds the "
                          "teacher's outputs of unmixed views, not of the mixed images; remove cache.dir (the teacher "
                          "then runs on the mixed batch) or set mixing.mixup_alpha=0 and mixing.cutmix_alpha=0")
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices")
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        errors.append(f"trainer.devices={show(devices)} is not allowed: expected a count >= 1, -1 (all), 'auto' "
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
        if lookup(config, "data.class_split") not in (None, MISSING) and not cls.embeds_images:
            errors.append(f"data.class_split={lookup(config, 'data.class_split')} tests on classes the student never "
                          f"trained on, which only an open-vocabulary student can classify; method {cls.name!r} "
                          "learns a fixed classifier (use method=openvocab, or remove data.class_split)")
        errors += cls.check_config(config)
        errors += _teacher_errors(config, cls)
        errors += _unlabelled_errors(config, cls)
        errors += _novel_protocol_errors(config)
    errors += _dataset_errors(config)
    if config.get("init_from") not in (None, "") and config.get("ckpt_path") in (None, ""):
        # a resume takes its weights from its checkpoint; checked here, where files are (like the dataset's)
        errors += input_file_errors("init_from", config["init_from"], "a pand checkpoint (.ckpt)")
    raise_option_errors(errors, "training setting")
    run_dir = config.get("run_dir") or lookup(config, "paths.runs_dir")
    if not for_cache_build and run_dir not in (None, MISSING):
        check_writable(run_dir, "the run folder")
    if cache.get("dir") and not (Path(cache["dir"]) / "meta.json").is_file():
        check_writable(cache["dir"], "the teacher cache folder (cache.dir)")


EVAL_SPLITS = ("val", "test")
# sections of a training config: `pand eval data=cub` would replace the checkpoint's whole data section by a string
_SECTIONS = frozenset({k.partition(".")[0] for k in (*TRAIN_RULES, *COOP_RULES) if "." in k}
                      | {"student", "method", "logger", "paths"})


def eval_override_errors(overrides: Mapping[str, Any]) -> list[str]:
    """Overrides of a checkpoint's config in ``pand eval``: single settings, in range where pand knows the range."""
    errors = [f"{key}={show(value)} would replace the whole {key} section of the checkpoint's config; override "
              f"single settings ({key}.NAME=VALUE) instead" for key, value in overrides.items()
              if key in _SECTIONS and not isinstance(value, Mapping)]
    return errors + check_rules(overrides, TRAIN_RULES)


def validate_eval_options(splits: Any, out: str | os.PathLike | None, *, ckpt_path: Any = MISSING,
                          overrides: Mapping[str, Any] | None = None,
                          clip_benchmark_dir: str | os.PathLike | None = None) -> None:
    """Refuse ``pand eval`` options before the checkpoint is loaded: the splits, the JSON file of the results, the
    folder of an open-vocabulary student's clip_benchmark files, and (from the command line) the checkpoint file and
    the overrides of its config."""
    errors = [] if ckpt_path is MISSING else input_file_errors("ckpt_path", ckpt_path, "a checkpoint file")
    if not isinstance(splits, (list, tuple)) or not splits or any(s not in EVAL_SPLITS for s in splits):
        shown = show(list(splits) if isinstance(splits, tuple) else splits)
        errors.append(f"splits={shown} is not allowed: expected a non-empty list of val and/or test, such as "
                      "[val,test] or [test]")
    if out is not None:
        errors += output_file_errors("out", out, (".json",))
    if clip_benchmark_dir is not None:
        errors += output_folder_errors("clip_benchmark_dir", clip_benchmark_dir)
    errors += eval_override_errors(overrides or {})
    raise_option_errors(errors)
    if out is not None:
        check_writable(Path(out).expanduser().absolute().parent, "the folder of out=")
    if clip_benchmark_dir is not None:
        check_writable(clip_benchmark_dir, "the folder of clip_benchmark_dir=")
