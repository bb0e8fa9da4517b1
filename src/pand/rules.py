"""Rules for option values, at the ground floor so that every layer can declare its options next to its code.

A setting out of range is refused with the option, its value and what is allowed, instead of passing silently (an
epoch count of -1 that trains forever, a neighbour count of 0 that turns NLRD off) or crashing late in torch. Each
method declares the ranges of its own options with these rules (``Distiller.option_rules``); the checks of a whole
composed config, which need to know the methods, the engine and the data, are in :mod:`pand.engine.config_checks`.

The options of ``pand predict`` and ``pand export`` are checked here too: they need nothing but these rules and the
file system, and are refused before torch is imported.
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

MISSING = object()


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


def lookup(config: Mapping[str, Any], key: str, default: Any = MISSING) -> Any:
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
        if value is MISSING:
            continue
        if rule.problem(value):
            # a misspelt choice (bf61) gets the closest allowed value
            hint = suggest(value, [str(c) for c in rule.choices]) if rule.kind == "choice" and \
                isinstance(value, str) else ""
            errors.append(f"{prefix}{key}={show(value)} is not allowed: expected {rule.describe()}{hint}")
    return errors


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)




_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
#: The values of ``data.novel_protocol`` (see :data:`pand.data.assembly.NOVEL_PROTOCOLS`).
NOVEL_PROTOCOL_SETTINGS = ("strict", "transductive")
#: Where the training views are made (``data.augment_on``): in the loader processes, or a batch at once on the device.
AUGMENT_ON = ("cpu", "device")


def device_errors(key: str, value: Any) -> list[str]:
    """``auto`` or ``cpu``; ``cuda``, ``cuda:N`` or ``mps`` where this machine has that device."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        # a stricter match than suggest(): tpu or gpu are not typos of cpu
        match = close_matches(value, ["auto", "cpu", "cuda", "mps"], cutoff=0.75, limit=1) \
            if isinstance(value, str) else []
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        return [f"{key}={show(value)} is not allowed: expected {DEVICES}{hint}"]
    if value in ("auto", "cpu"):
        return []
    import torch

    instead = f"use {key}=cpu or {key}=auto"
    if value == "mps":
        if torch.backends.mps.is_available():
            return []
        return [f"{key}={show(value)} is not available: torch finds no Apple GPU (MPS) on this machine; {instead}"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (f"torch {torch.__version__} is a build without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} finds none")
        return [f"{key}={show(value)} is not available: this machine has no CUDA GPU ({why}); {instead}"]
    index = int(value.partition(":")[2] or 0)
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        return [f"{key}={show(value)} is not available: this machine has {count} CUDA device(s), {have}"]
    return []


def resolve_device(value: str | None) -> str:
    """The device a (checked) device setting names: ``auto`` or unset is the GPU when torch finds one, else the CPU."""
    if value not in (None, "auto"):
        return str(value)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_path(key: str, value: Any) -> tuple[Path | None, list[str]]:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        return None, [f"{key}={show(value)} is not allowed: expected a path"]
    return Path(value).expanduser(), []


def input_file_errors(key: str, value: Any, what: str) -> list[str]:
    """A file the command reads: it exists, is a file and can be read."""
    path, errors = _as_path(key, value)
    if errors:
        return errors
    shown = show(os.fspath(value))
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
    shown, allowed = show(os.fspath(value)), " or ".join(suffixes)
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
        return [f"{key}={show(os.fspath(value))} is a file; expected a folder (created if missing)"]
    return []


def images_errors(key: str, value: Any) -> list[str]:
    """An image file, a folder or a glob pattern that matches something (which of them are images is for later)."""
    path, errors = _as_path(key, value)
    if errors or path.exists():
        return errors
    pattern, shown = str(path), show(os.fspath(value))
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
        source = f"{file_key}={show(os.fspath(classes_file))}"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source} is not UTF-8 text (at byte {err.start})") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif classes is None:
        return None
    elif isinstance(classes, str):
        source = f"{key}={show(classes)}"
        names = [c.strip() for c in classes.split(",") if c.strip()]
    elif isinstance(classes, (list, tuple)) and all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                                     for c in classes):
        source = f"{key}={show(list(classes))}"
        names = [str(c).strip() for c in classes if str(c).strip()]
    else:
        raise ConfigError(f"{key}={show(classes)} is not allowed: expected class names, as {key}=[a,b,c] or "
                          f"{key}=a,b,c")
    if not names:
        raise ConfigError(f"{source}: the list of class names is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: class names must be distinct; repeated: {', '.join(map(repr, duplicates))}")
    return names


def raise_option_errors(errors: Sequence[str], what: str = "option") -> None:
    """Refuse ``errors`` (if any): one problem fits on the ``pand COMMAND: error: ...`` line; several are listed one
    per line under it. ``what`` names the kind of setting (``training setting``, ``stage-1 setting``)."""
    if len(errors) == 1:
        raise ConfigError(f"invalid {what}: {errors[0]}")
    if errors:
        raise ConfigError(f"{len(errors)} invalid {what}s:\n  " + "\n  ".join(errors))


def data_setting_errors(config: Mapping[str, Any]) -> list[str]:
    """The ``data`` settings that only make sense together (crop and resize sizes, CLIP templates, overlap), shared by
    training and stage 1."""
    errors = []
    data = config.get("data") or {}
    image, resize = data.get("image_size"), data.get("resize_size")
    if isinstance(image, int) and isinstance(resize, int) and resize < image:
        errors.append(f"data.resize_size={resize} is smaller than data.image_size={image}: the crop cannot fit")
    templates = data.get("templates", MISSING)
    if templates is not MISSING:
        if not isinstance(templates, (list, tuple)) or not templates:
            errors.append(f"data.templates={show(templates)} is not allowed: expected a non-empty list of prompts")
        else:
            errors.extend(f"data.templates[{i}]={t!r} has no '{{}}' where the class name goes"
                          for i, t in enumerate(templates) if not isinstance(t, str) or "{}" not in t)
    allow = data.get("allow_overlap", MISSING)
    if allow is not MISSING and not isinstance(allow, bool):
        errors.append(f"data.allow_overlap={show(allow)} is not allowed: expected true or false (true: run although "
                      "a val or test image is also a training image, and record it in the run summary)")
    return errors



def _is_export_folder(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value).strip()) and (
        Path(value).expanduser() / "student.json").is_file()


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
    if not _is_export_folder(options.get("ckpt_path")):  # pand export's folder names its one model file
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


EXPORT_FORMATS = ("onnx", "torch_export", "safetensors", "open_clip", "timm")
# what a format needs besides pand's own dependencies (pip install pand[export])
EXPORT_PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}
# int8 export (pand.export_int8): ONNX Runtime's static quantization, calibrated on training images
EXPORT_QUANTIZE = ("none", "int8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
EXPORT_RULES: dict[str, Rule] = {"format": choice(*EXPORT_FORMATS), "quantize": choice(*EXPORT_QUANTIZE, optional=True),
                                 "calibration": integer(1), "calibration_method": choice(*CALIBRATION_METHODS)}
# Why quantize=int8 is refused for the other formats.
_NOT_QUANTIZED = {
    "torch_export": "PyTorch's int8 flow for exported programs (PT2E) has moved out of torch into torchao, whose x86 "
                    "quantizer fails on torch 2.14's exported ResNet-18 ('Input partition has more than one output "
                    "node'); export format=onnx quantize=int8 instead",
    "safetensors": "safetensors holds float weights for torchvision / timm to load; export format=onnx quantize=int8 "
                   "for an int8 model",
    "open_clip": "open_clip loads float towers; export format=onnx quantize=int8 for an int8 image classifier",
    "timm": "timm builds float models from the folder; export format=onnx quantize=int8 for an int8 model",
}


def _missing_export_packages(fmt: str) -> list[str]:
    import importlib.util

    return [m for m in EXPORT_PACKAGES.get(fmt, ()) if importlib.util.find_spec(m) is None]


def validate_export_options(options: Mapping[str, Any]) -> list[str] | None:
    """Refuse ``pand export`` options before anything is loaded; returns the class names given, if any
    (``class_names=a,b,...``, or the path of a file with one name per line)."""
    errors = check_rules(options, EXPORT_RULES)
    errors += input_file_errors("ckpt_path", options.get("ckpt_path"), "a checkpoint file")
    if isinstance(options.get("ckpt_path"), (str, os.PathLike)) and Path(options["ckpt_path"]).suffix.lower() in (
            ".onnx", ".pt2"):  # pand.deploy.load_student reads these too, but they hold no trainable student
        errors.append(f"ckpt_path={show(os.fspath(options['ckpt_path']))} is an exported model; export from the "
                      "checkpoint it came from (its student.json names it)")
    errors += output_folder_errors("out", options.get("out"))
    fmt = options.get("format")
    missing = [] if errors or fmt not in EXPORT_PACKAGES else _missing_export_packages(fmt)
    if missing:
        errors.append(f"format={fmt} needs {', '.join(EXPORT_PACKAGES[fmt])} (missing: {', '.join(missing)}): "
                      "pip install pand[export]")
    errors += export_text_tower_errors(fmt, options.get("text_tower"))
    if options.get("quantize") == "int8" and fmt in EXPORT_FORMATS and fmt != "onnx":
        errors.append(f"quantize=int8 is not available for format={fmt}: "
                      + _NOT_QUANTIZED.get(fmt, "export format=onnx quantize=int8 instead"))
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


#: The files of a distilled text tower's folder (``pand teacher text-tower``; :mod:`pand.teachers.text_tower`).
TEXT_TOWER_WEIGHTS, TEXT_TOWER_RECORD = "text_tower.safetensors", "text_tower.json"
#: ``text_tower=`` of ``pand export format=open_clip``: the teacher's own text tower, or a distilled one's folder.
TEACHER_TEXT_TOWER = "teacher"


def text_tower_folder_errors(key: str, value: Any) -> list[str]:
    """A folder that ``pand teacher text-tower`` wrote: it exists and holds the tower's two files."""
    path, errors = _as_path(key, value)
    if errors:
        return errors
    shown = show(os.fspath(value))
    if not path.is_dir():
        return [f"{key}={shown}: no such folder; expected {TEACHER_TEXT_TOWER!r} or the folder of a text tower made by "
                "pand teacher text-tower"]
    missing = [n for n in (TEXT_TOWER_WEIGHTS, TEXT_TOWER_RECORD) if not (path / n).is_file()]
    if missing:
        return [f"{key}={shown} is not a text tower folder: it has no {' or '.join(missing)} (pand teacher text-tower "
                "writes them)"]
    return []


def export_text_tower_errors(fmt: Any, value: Any) -> list[str]:
    if value in (None, TEACHER_TEXT_TOWER):
        return []
    if fmt != "open_clip":
        return [f"text_tower={show(os.fspath(value) if isinstance(value, os.PathLike) else value)} chooses the text "
                f"tower of format=open_clip; format={show(fmt)} exports the student alone"]
    return text_tower_folder_errors("text_tower", value)


TEXT_TOWER_RULES: dict[str, Rule] = {
    "width": integer(1),
    "heads": integer(1),
    "layers": integer(1),
    "steps": integer(1),
    "batch_size": integer(1),
    "lr": POSITIVE,
    "seed": integer(0),
    "warm_start": BOOL,
    "contrastive_weight": NON_NEGATIVE,
    "temperature": number(0, low_open=True, optional=True),
}


def validate_text_tower_options(options: Mapping[str, Any]) -> None:
    """Refuse ``pand teacher text-tower`` options before torch is imported and the checkpoint loaded."""
    errors = check_rules(options, TEXT_TOWER_RULES)
    errors += input_file_errors("ckpt_path", options.get("ckpt_path"), "a checkpoint file")
    errors += output_folder_errors("out", options.get("out"))
    if options.get("corpus") is not None:
        errors += input_file_errors("corpus", options["corpus"], "a UTF-8 text file with one training text per line")
    if options.get("device") is not None:
        errors += device_errors("device", options["device"])
    width, heads = options.get("width"), options.get("heads")
    if not errors and width is not None and heads is not None and width % heads:
        errors.append(f"width={width} is not a multiple of heads={heads}: each attention head takes an equal share of "
                      "the width")
    raise_option_errors(errors)
    check_writable(options["out"], "the text tower folder (out=)")
