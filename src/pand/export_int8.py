"""int8 students: ``pand export format=onnx quantize=int8 [calibration=N] [calibration_method=minmax]``.

The float ONNX graph of :mod:`pand.export` is quantized with ONNX Runtime's static quantization in the QDQ format
(QuantizeLinear / DequantizeLinear pairs around each quantized operator, which ONNX Runtime fuses into integer
kernels when it loads the file):

* weights: int8, one scale per output channel, symmetric (zero point 0, range [-127, 127]);
* activations: uint8, one scale and zero point per tensor, their ranges measured on ``N`` training images prepared
  with the run's evaluation preprocessing (the view the student sees when it predicts), seeded so that every export
  of a run uses the same images.

Before quantizing, ONNX Runtime's pre-processing infers shapes and folds each BatchNorm into the convolution before
it, so the weights quantized are the folded ones. With one symmetric scale per output channel, folding commutes with
quantizing (a BatchNorm scales whole output channels), which is why pand's quantization-aware training can
fake-quantize the unfolded weights (:mod:`pand.students.quantize`).

Operators ONNX Runtime's quantizer does not cover (a ViT's GELU, the ReduceMean a torchvision ResNet's global average
pool exports as, for example) compute in float between the integer ones, on dequantized values; the export names
them in ``student.json`` (``quantization.float_operators``), with the share of the multiply-accumulate operators
(Conv, Gemm, MatMul) that run in int8.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pand.data.assembly import UNLABELLED_SPLIT
from pand.engine.data import PandDataModule
from pand.errors import ConfigError, PandError
from pand.io import atomic_write_bytes
from pand.rules import CALIBRATION_METHODS

log = logging.getLogger("pand")

INT8_SUFFIX = ".int8.onnx"
DEFAULT_CALIBRATION = 512
SCHEME = {
    "format": "QDQ (QuantizeLinear / DequantizeLinear), fused into integer kernels by ONNX Runtime",
    "weights": "int8, per output channel, symmetric: scale = max |w| / 127, zero point 0",
    "activations": "uint8, per tensor, asymmetric: scale = (max - min) / 255 over a range that includes 0",
}
# The operators whose arithmetic dominates a CNN or a transformer: the share of them that runs in int8 is reported.
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Operators that move or select data without arithmetic (many of them build shapes): never reported as float.
_DATA_MOVEMENT = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant", "ConstantOfShape", "Identity", "Shape",
                            "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice",
                            "Split", "Gather", "Expand", "Range", "Pad", "Tile"})
# ONNX Runtime's MinMax calibration keeps every batch's intermediate outputs until it reduces them (gigabytes for
# 512 images at 224 px); strided calibration reduces after each batch and merges the ranges, which for min / max is
# the same result. (Its CalibMaxIntermediateOutputs option drops the outputs it clears in onnxruntime 1.32.)
_STRIDE = 1
_NAMES_SHOWN = 5


class Calibration:
    """Batches of calibration images (float32 N x 3 x S x S), read afresh by each iteration. ``batch_sizes`` are
    their sizes, known before any image is read (``len``: the number of batches)."""

    def __init__(self, batches: Callable[[], Iterable[np.ndarray]], batch_sizes: Sequence[int],
                 sources: dict[str, int] | None = None) -> None:
        self._batches, self.batch_sizes = batches, [int(b) for b in batch_sizes]
        self.sources = dict(sources or {})  # images per split of the run, where they come from one

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self.batch_sizes)


def calibration_images(config: dict[str, Any], count: int) -> Calibration:
    """``count`` training images of the run (evaluation preprocessing), the same seeded subset every time: drawn
    from its labelled training images and, for a run that had them (``data.unlabelled``), its unlabelled ones."""
    data = PandDataModule(config["data"], seed=int(config.get("seed", 0)))
    pools = [(split, len(data.splits[split])) for split in ("train", UNLABELLED_SPLIT)
             if split in data.splits and len(data.splits[split])]
    total = sum(n for _, n in pools)
    if total == 0:
        raise ConfigError("the run has no training images to calibrate the int8 model on")
    # seeded by the count alone, so that calibrating twice with the same N reads the same images
    chosen = np.sort(np.random.default_rng(count).choice(total, min(count, total), replace=False))
    loaders, sources, sizes, start = [], {}, [], 0
    for split, n in pools:
        picked = [int(i) - start for i in chosen if start <= i < start + n]
        if picked:
            loader = data.eval_dataloader(split, indices=picked)
            loaders.append(loader)
            sources[split] = len(picked)
            full, rest = divmod(len(picked), loader.batch_size)
            sizes += [loader.batch_size] * full + ([rest] if rest else [])
        start += n

    def batches() -> Iterator[np.ndarray]:
        for loader in loaders:
            for batch in loader:
                yield batch["image"].float().numpy()

    return Calibration(batches, sizes, sources)


def quantize_onnx(float_path: Path, out_path: Path, batches: Calibration, *,
                  method: str = "minmax", input_name: str = "image", fixed_batch: int | None = None
                  ) -> dict[str, Any]:
    """Quantize the float ONNX model at ``float_path`` into ``out_path`` (written atomically), calibrated on the
    images of ``batches``. ``fixed_batch``: the model takes batches of that size only (its rows are fed one
    batch at a time). Returns what ``student.json`` records under ``quantization``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration_method={method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    reader = _Reader(batches, input_name, fixed_batch)
    with tempfile.TemporaryDirectory(prefix="pand-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
        except Exception as err:  # noqa: BLE001 - its symbolic shape inference fails on some graphs (an
            # open-vocabulary student's normalised embedding); ONNX's own shape inference serves the quantizer too
            log.info("int8 export: ONNX Runtime's symbolic shape inference failed (%s); using ONNX's",
                     str(err).splitlines()[0] if str(err) else type(err).__name__)
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, calibrate_method=calibrate,
                        extra_options={"CalibStridedMinMax": _STRIDE} if method == "minmax" else {})
        if reader.images == 0:
            raise PandError("no calibration image was read: the int8 model was not written")
        data = quantized.read_bytes()
    graph = onnx.load_from_string(data).graph
    coverage = operator_coverage(graph)
    agreement = _agreement(float_path, data, batches, input_name, fixed_batch, ort)
    atomic_write_bytes(out_path, data)
    if coverage["float_operators"]:
        log.warning("int8 export: these operators compute in float between the int8 ones (ONNX Runtime's quantizer "
                    "does not cover them): %s",
                    "; ".join(f"{op} x{len(names)} ({', '.join(names[:_NAMES_SHOWN])}"
                              f"{', ...' if len(names) > _NAMES_SHOWN else ''})"
                              for op, names in coverage["float_operators"].items()))
    return {**SCHEME, "runtime": f"onnxruntime {ort.__version__}", "float_file": float_path.name,
            "calibration": {"images": reader.images, "from_splits": batches.sources, "preprocessing": "evaluation",
                            "method": method},
            "top1_agreement_with_float_on_calibration_images": agreement, **coverage}


class _Reader:
    """ONNX Runtime's calibration reader over the calibration batches: ``get_next`` until ``None``; strided
    calibration asks for ``len`` feeds and reads them ``set_range`` by ``set_range``, in order."""

    def __init__(self, batches: Calibration, input_name: str, fixed_batch: int | None) -> None:
        self._batches, self._name, self._fixed = batches, input_name, fixed_batch
        self._it: Iterator[np.ndarray] | None = None
        self._left: int | None = None
        self.images = 0

    def __len__(self) -> int:
        # a model that takes fixed batches is fed slices of its batch: counted from the sizes, no image read
        return len(self._batches) if not self._fixed else sum(b // self._fixed for b in self._batches.batch_sizes)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def _feeds(self) -> Iterator[np.ndarray]:
        for batch in self._batches:
            if self._fixed:
                yield from (batch[i:i + self._fixed] for i in range(0, len(batch) - self._fixed + 1, self._fixed))
            else:
                yield batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._feeds()
        if self._left is not None:
            if self._left == 0:
                return None
            self._left -= 1
        batch = next(self._it, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {self._name: np.ascontiguousarray(batch, dtype=np.float32)}


def operator_coverage(graph) -> dict[str, Any]:
    """Which operators of a QDQ graph compute in int8: those of a type ONNX Runtime's quantizer covers whose every
    float input made in the graph comes through a DequantizeLinear (weights included). An operator of another type
    computes in float on dequantized values. Returns the int8 share of the multiply-accumulate operators and the
    operators that compute in float, by type, with their node names (data movement such as Reshape or Concat is not
    listed: it has no arithmetic)."""
    quantizable = _quantizable_ops()
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    produced = {out for node in graph.node for out in node.output}
    float_nodes: dict[str, list[str]] = {}
    macs = int8_macs = 0
    for node in graph.node:
        if node.op_type in _DATA_MOVEMENT:
            continue
        read = [i for i in node.input if i and i in produced]  # not initialisers (shapes, the quantized constants)
        quantized = node.op_type in quantizable and bool(read) and all(i in dequantized for i in read)
        if node.op_type in _MAC_OPS:
            macs += 1
            int8_macs += quantized
        if not quantized and read:
            float_nodes.setdefault(node.op_type, []).append(node.name or node.output[0])
    return {"mac_operators": macs, "int8_mac_operators": int8_macs,
            "int8_mac_share": round(int8_macs / macs, 4) if macs else None, "float_operators": float_nodes}


def _quantizable_ops() -> frozenset[str]:
    """The operator types ONNX Runtime's static quantizer quantizes (QDQ and QOperator registries, as quantize_static
    uses them by default)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


def _agreement(float_path: Path, data: bytes, batches, input_name: str, fixed_batch: int | None, ort) -> float:
    """Top-1 agreement of the int8 model with the float one on the calibration images: a quick sign of a broken
    quantization (a few points of disagreement are usual; the real measure is ``pand eval`` on the test split)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
                for src in (str(float_path), data)]
    same = total = 0
    for batch in _Reader(batches, input_name, fixed_batch)._feeds():
        feed = {input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        a, b = (s.run(None, feed)[0].argmax(axis=-1) for s in sessions)
        same += int((a == b).sum())
        total += len(a)
    return round(same / total, 4) if total else 0.0
