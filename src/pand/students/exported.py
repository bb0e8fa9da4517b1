"""A student as ``pand export`` shipped it: ``student.onnx`` (onnxruntime) or ``student.pt2`` (``torch.export``), read
with the ``student.json`` beside it, so that ``pand eval model=...`` and ``pand predict`` measure the file that ships
rather than the checkpoint it came from.

The model is an ``nn.Module`` that takes a float32 batch N x 3 x S x S (prepared as ``preprocessing`` says) and
returns the logits; it runs on the CPU. A graph exported for a fixed batch (``"dynamic_batch": false``) takes any
batch: it is run on slices of its size. Any file of the folder can be named (``student.int8.onnx`` beside
``student.onnx``): the ``student.json`` of its folder describes it, whatever its ``file`` key says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pand.data.transforms import eval_transform
from pand.errors import CheckpointError, ConfigError, MismatchError
from pand.io import read_json
from pand.students.loaded import LoadedStudent

# The names pand.export writes (checked against it in tests/test_exported.py; export sits above this layer).
METADATA_NAME = "student.json"
MODEL_FILES = ("student.onnx", "student.pt2")
SUFFIXES = {".onnx": "onnx", ".pt2": "torch_export"}


def is_exported_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (a ``.onnx`` or ``.pt2`` file, or an export folder) rather than a
    checkpoint."""
    path = Path(path).expanduser()
    return path.suffix.lower() in SUFFIXES or path.is_dir()


def exported_model_file(path: str | os.PathLike) -> Path:
    """The model file ``path`` names: itself, or the one ``student.onnx`` / ``student.pt2`` of an export folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if len(found) != 1:
            held = f"both {' and '.join(MODEL_FILES)}" if found else f"neither {' nor '.join(MODEL_FILES)}"
            raise ConfigError(f"{path} holds {held}: name the model file to load (such as {path / MODEL_FILES[0]})")
        return found[0]
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path} is not an exported model: expected a .onnx or .pt2 file written by pand export "
                          "(or its folder)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    return path


class ExportedModel(nn.Module):
    """An exported graph behind the interface of a pand student: ``forward(images) -> logits``, ``num_classes``.

    ``batch_size`` is the batch a fixed-batch graph takes (None: any). ``runtime`` names what runs it.
    """

    def __init__(self, path: Path, meta: Mapping[str, Any], num_classes: int, batch_size: int | None,
                 runtime: str) -> None:
        super().__init__()
        self.path, self.meta, self.runtime = path, dict(meta), runtime
        self.format = SUFFIXES[path.suffix.lower()]
        self.num_classes = int(num_classes)
        self.batch_size = batch_size
        self.train(False)

    def train(self, mode: bool = True) -> ExportedModel:
        # The graph was exported in eval mode and stays so; torch.export's module refuses train() and eval(), which
        # Lightning calls around validation.
        self.training = bool(mode)
        return self

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(self._device(), torch.float32).contiguous()
        b = self.batch_size
        if b is None or len(x) == b:
            return self._run(x).to(images.device)
        parts = []
        for start in range(0, len(x), b):
            chunk = x[start:start + b]
            n = len(chunk)
            if n < b:  # only a graph fixed at a batch above 1 needs this; pand exports fixed ones for 1
                chunk = torch.cat([chunk, chunk.new_zeros(b - n, *chunk.shape[1:])])
            parts.append(self._run(chunk)[:n])
        return torch.cat(parts).to(images.device)

    def extra_repr(self) -> str:
        return f"{self.path}, {self.runtime}, batch={'any' if self.batch_size is None else self.batch_size}"


class OnnxModel(ExportedModel):
    def __init__(self, path: Path, meta: Mapping[str, Any], num_classes: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"{path} is an ONNX model: running it needs onnxruntime (pip install pand[export])"
                              ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses, so the two compare fairly
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a damaged or foreign graph
            raise CheckpointError(f"{path} cannot be loaded by onnxruntime: {_first_line(err)}") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        self.input_name = _io_name(path, meta, "input", [i.name for i in inputs])
        self.output_name = _io_name(path, meta, "output", [o.name for o in outputs])
        graph_in = next(i for i in inputs if i.name == self.input_name)
        graph_out = next(o for o in outputs if o.name == self.output_name)
        classes = graph_out.shape[-1] if graph_out.shape else None
        if isinstance(classes, int) and classes != num_classes:
            raise MismatchError(f"{path} gives {classes} logits per image; the {METADATA_NAME} beside it names "
                                f"{num_classes} classes")
        batch = graph_in.shape[0] if graph_in.shape else None
        if not isinstance(batch, int):  # a named or unknown dimension is dynamic
            batch = _fixed_batch(meta)
        super().__init__(path, meta, num_classes, batch, f"onnxruntime {ort.__version__} (CPUExecutionProvider)")
        self.session = session

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: images.numpy()})[0])


class ProgramModel(ExportedModel):
    def __init__(self, path: Path, meta: Mapping[str, Any], num_classes: int) -> None:
        try:
            module = torch.export.load(path).module()
        except Exception as err:  # noqa: BLE001 - a damaged or foreign archive fails in many ways
            raise CheckpointError(f"{path} cannot be loaded by torch.export.load: {_first_line(err)}") from None
        super().__init__(path, meta, num_classes, _fixed_batch(meta), f"torch {torch.__version__} (torch.export)")
        self.program = module

    def _device(self) -> torch.device:
        # wherever the user moved it: the input follows the weights
        tensor = next(iter(self.program.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.program.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return self.program(images)


class ExportedStudent(LoadedStudent):
    """``(model, preprocess, class_names)`` as :class:`~pand.students.loaded.LoadedStudent`; ``.config`` holds what of
    the run's config ``student.json`` keeps (``data``, ``seed``, ``student``), ``.meta`` all of ``student.json``,
    ``.path`` the model file and ``.metadata_path`` its ``student.json``."""

    def __new__(cls, model: ExportedModel, preprocess: Callable[[Any], torch.Tensor], class_names: list[str],
                config: dict[str, Any], metadata_path: Path) -> ExportedStudent:
        loaded = super().__new__(cls, model, preprocess, class_names, config)
        loaded.meta, loaded.path, loaded.metadata_path = model.meta, model.path, metadata_path
        return loaded


def load_exported(path: str | os.PathLike) -> ExportedStudent:
    """The exported student at ``path`` (a ``.onnx`` or ``.pt2`` file, or a folder holding one of ``student.onnx``
    and ``student.pt2``), with the preprocessing and class names of the ``student.json`` in its folder."""
    file = exported_model_file(path)
    json_path = file.parent / METADATA_NAME
    if not json_path.is_file():
        raise ConfigError(f"{json_path} is missing: {file.name} is read with the {METADATA_NAME} that pand export "
                          "wrote beside it (its input, classes and preprocessing); copy it next to the model or "
                          "export again")
    meta = read_json(json_path, "exported model description")
    try:
        names = [str(c) for c in meta["class_names"]]
        pp = meta["preprocessing"]
        transform = eval_transform(int(pp["image_size"]), int(pp["resize_size"]), tuple(pp["mean"]),
                                   tuple(pp["std"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{json_path} is not a description pand export wrote: {_first_line(err)} is missing "
                              "or malformed") from None
    model_cls = OnnxModel if SUFFIXES[file.suffix.lower()] == "onnx" else ProgramModel
    model = model_cls(file, meta, len(names))
    arch = meta.get("architecture") or {}
    # Older exports have no data section: the preprocessing is what prediction needs of it.
    data = meta.get("data") or {k: pp[k] for k in ("image_size", "resize_size", "mean", "std")}
    config = {"data": data, "seed": int(meta.get("seed", 0)),
              "student": {k: arch[k] for k in ("name", "source", "kwargs") if k in arch}}
    return ExportedStudent(model, transform, names, config, json_path)


def _fixed_batch(meta: Mapping[str, Any]) -> int | None:
    return int(meta.get("batch_size") or 1) if meta.get("dynamic_batch") is False else None


def _io_name(path: Path, meta: Mapping[str, Any], which: str, names: list[str]) -> str:
    want = (meta.get(which) or {}).get("name")
    if want is None and len(names) == 1:
        return names[0]
    if want not in names:
        raise MismatchError(f"{path} has {which}s {names}; the {METADATA_NAME} beside it names {want!r}")
    return want


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
