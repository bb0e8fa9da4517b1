"""The graph formats of ``pand export``: a student as an ONNX model or a ``torch.export`` program, each checked
against the student before it is written.

A batch dimension that stays dynamic is checked at other batch sizes than the example's; a model that cannot be
exported with one is exported for a fixed batch of 1 instead, and the record returned says so. Here, below
:mod:`pand.export`, so that ``pand bench`` exports the models it times with the same code.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pand.errors import PandError
from pand.io import atomic_write_bytes, atomic_write_with

log = logging.getLogger("pand")

INPUT_NAME, OUTPUT_NAME = "image", "logits"
# torch.export specialises a dimension of size 1 to a constant, so the example batch that keeps it dynamic is larger.
EXAMPLE_BATCH = 2
_CHECK_BATCHES = (1, 3)
FIXED_BATCH = 1
# Exported graphs fuse and reorder float32 operations; a real export error is far larger than this.
_ATOL, _RTOL = 1e-3, 1e-3


# -- checks -----------------------------------------------------------------------------------------
def _compare(reference: nn.Module, run, side: int, batches: Sequence[int], what: str) -> float:
    worst = 0.0
    generator = torch.Generator().manual_seed(1)
    for b in batches:
        x = torch.randn(b, 3, side, side, generator=generator)
        with torch.no_grad():
            want = reference(x)
            got = torch.as_tensor(run(x))
        if got.shape != want.shape:
            raise PandError(f"the {what} gives logits of shape {tuple(got.shape)} for a batch of {b}, the student "
                            f"{tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        if diff > _ATOL + _RTOL * want.abs().max().item():
            raise PandError(f"the {what} differs from the student by up to {diff:.3g} in the logits (batch {b}); "
                            "nothing was written")
        worst = max(worst, diff)
    return worst


def _dynamic_batch() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1)


def _dynamic_or_fixed(build, check) -> tuple[Any, dict[str, Any]]:
    """``build(dynamic)`` then ``check(artefact, batches)``: with a dynamic batch checked at several sizes, or, where
    that fails to export or to match, for a fixed batch of one. Returns the artefact and what ``student.json`` says."""
    try:
        batches = (*_CHECK_BATCHES, EXAMPLE_BATCH)
        artefact = build(True)
        diff = check(artefact, batches)
        return artefact, {"dynamic_batch": True, "check": {"batch_sizes": list(batches), "max_abs_logit_diff": diff}}
    except Exception as err:  # noqa: BLE001 - export failures come in many types; the fixed batch is the fallback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    log.warning("the student could not be exported with a dynamic batch (%s); it takes batches of %d only",
                reason, FIXED_BATCH)
    artefact = build(False)
    diff = check(artefact, (FIXED_BATCH,))
    return artefact, {"dynamic_batch": False, "batch_size": FIXED_BATCH, "dynamic_batch_error": reason,
                      "check": {"batch_sizes": [FIXED_BATCH], "max_abs_logit_diff": diff}}


def write_torch_export(model: nn.Module, path: Path, example: torch.Tensor) -> dict[str, Any]:
    def build(dynamic: bool):
        if dynamic:
            return torch.export.export(model, (example,), dynamic_shapes=({0: _dynamic_batch()},))
        return torch.export.export(model, (example[:FIXED_BATCH],))

    def check(program, batches) -> float:
        return _compare(model, program.module(), example.shape[-1], batches, "exported program")

    program, record = _dynamic_or_fixed(build, check)
    atomic_write_with(path, lambda f: torch.export.save(program, f))
    record["check"]["runtime"] = f"torch {torch.__version__}"
    return {**record, "load": "torch.export.load(path).module()(image)"}


@contextlib.contextmanager
def _quiet_stdout():
    # The exporter reports its progress on stdout, which `pand export` keeps for its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        yield


def write_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    def build(dynamic: bool) -> bytes:
        args = (example,) if dynamic else (example[:FIXED_BATCH],)
        with _quiet_stdout():
            program = torch.onnx.export(model, args, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], verbose=False,
                                        dynamic_shapes=({0: _dynamic_batch()},) if dynamic else None)
        return program.model_proto.SerializeToString()

    def check(data: bytes, batches) -> float:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise PandError(f"the ONNX graph has inputs {names[0]} and outputs {names[1]}, expected "
                            f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
        return _compare(model, lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], example.shape[-1],
                        batches, "ONNX model (onnxruntime)")

    data, record = _dynamic_or_fixed(build, check)
    atomic_write_bytes(path, data)
    record["check"]["runtime"] = f"onnxruntime {ort.__version__}"
    opset = next((o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx")), None)
    return {**record, "opset": opset}
