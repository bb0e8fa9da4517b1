"""Latency of a student as it ships: PyTorch eager (float32) next to its ONNX Runtime float32 and int8 models.

Every model gets the same threads (PyTorch's intra-op threads, ONNX Runtime's ``intra_op_num_threads``), the same
inputs, and is timed round-robin with the others (one batch of each in turn), so that drift of the machine affects
every figure alike. Sizes on disk are the files' (PyTorch's: its float32 weights). int8 speed on x86 depends on the
CPU's integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX), which the result lists.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pand.export_int8 import Calibration, quantize_onnx
from pand.export_programs import INPUT_NAME, write_onnx

#: The x86 and Arm instruction sets that decide how fast float32, bf16 and int8 inference can be.
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                 "asimddp", "i8mm", "sve")
PYTORCH = "PyTorch eager float32"
ONNX_FLOAT = "ONNX Runtime float32"
ONNX_INT8 = "ONNX Runtime int8"


def instruction_sets(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The notable instruction sets of this CPU (from ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in NOTABLE_FLAGS if f in flags]


def _session(path: str | Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ONNX Runtime's idle threads spin, waiting for the next run, by default: timed in turn with PyTorch, they would
    # take the cores PyTorch runs on (its batch-1 forward measured 44 ms instead of 6 at 2 threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_models(model: nn.Module, onnx_files: Mapping[str, str | Path], image_size: int, *, threads: int,
                batches: Sequence[int] = (1, 32), repeats: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Median ms per batch of ``model`` (eager, float32, CPU) and of each ONNX file, at each batch size, with the
    speed-up over PyTorch and the size on disk."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.cpu().eval()
        sessions = {name: _session(path, threads) for name, path in onnx_files.items()}
        g = torch.Generator().manual_seed(3)
        inputs = {b: torch.randn(b, 3, image_size, image_size, generator=g) for b in batches}
        runners = {PYTORCH: lambda x: model(x)}
        for name, session in sessions.items():
            runners[name] = (lambda s: lambda x: s.run(None, {INPUT_NAME: x.numpy()}))(session)
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in batches}
        with torch.inference_mode():
            for i in range(warmup + repeats):
                for b in batches:
                    for name, run in runners.items():
                        start = time.perf_counter()
                        run(inputs[b])
                        if i >= warmup:
                            times[name, b].append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    med = {key: statistics.median(v) for key, v in times.items()}
    sizes = {PYTORCH: sum(p.numel() * 4 for p in model.parameters())}
    sizes.update({name: Path(path).stat().st_size for name, path in onnx_files.items()})
    models = {name: {"ms": {str(b): round(med[name, b], 3) for b in batches},
                     "images_per_s": {str(b): round(b * 1000.0 / med[name, b], 1) for b in batches},
                     "speedup": {str(b): round(med[PYTORCH, b] / med[name, b], 3) for b in batches},
                     "megabytes": round(sizes[name] / 1e6, 3)} for name in runners}
    return {"threads": threads, "batches": list(batches), "repeats": repeats, "warmup": warmup,
            "isa": instruction_sets(), "models": models}


def exported_rows(model: nn.Module, image_size: int, *, threads: int, batches: Sequence[int], repeats: int,
                  warmup: int, calibration_batches: int = 4) -> dict[str, Any]:
    """``pand bench --latency``'s rows of a student as it ships: exported to ONNX, quantized to int8 (calibrated on
    random images: the weights are random too, and latency does not depend on either), and timed next to PyTorch."""
    model = model.cpu().eval()
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(16, 3, image_size, image_size, generator=g).numpy() for _ in range(calibration_batches)]
    with tempfile.TemporaryDirectory(prefix="pand-bench-") as tmp:
        float_path, int8_path = Path(tmp) / "student.onnx", Path(tmp) / "student.int8.onnx"
        example = torch.randn(2, 3, image_size, image_size, generator=g)
        record = write_onnx(model, float_path, example)
        fixed = None if record.get("dynamic_batch", True) else int(record["batch_size"])
        quantized = quantize_onnx(float_path, int8_path, Calibration(lambda: iter(images), [len(b) for b in images]),
                                  fixed_batch=fixed)
        if fixed:
            batches = [b for b in batches if b == fixed] or [fixed]
        result = time_models(model, {ONNX_FLOAT: float_path, ONNX_INT8: int8_path}, image_size, threads=threads,
                             batches=batches, repeats=repeats, warmup=warmup)
    result["int8"] = {k: quantized[k] for k in ("int8_mac_share", "float_operators", "runtime")}
    return result

