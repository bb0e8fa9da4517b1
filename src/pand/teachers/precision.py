"""Low-precision (autocast) passes of a frozen teacher, and the measured check that they still agree with fp32.

``pand features``, ``pand prompts`` and ``pand cache build`` run the frozen teacher without training a student; each
has a ``precision`` setting (``features.precision``, ``prompts.precision``, ``cache.precision``): ``fp32`` (the
default, exact), ``bf16`` or ``fp16`` (``torch.autocast`` with that dtype on the teacher's device). A low-precision
pass is checked, not trusted: the FIRST batch of every pass is computed both in fp32 and in the low precision
(:class:`AgreementProbe`), the two are compared row by row (:func:`measure_agreement`), and the pass is refused
(:func:`check_agreement`, :class:`~pand.errors.PrecisionError`) when the largest relative L2 error of a row exceeds
``precision_tolerance`` (default :data:`DEFAULT_TOLERANCE`, 0.02) or any output is NaN or infinite. The
low-precision result is what is stored; the stats go into the artefact's record and the command's JSON summary.

What the precisions buy, measured with this module on the CPU (torch 2.14 CPU autocast, 2 threads): three probe
batches of 32 images of standard-normal noise at the model's input size, through the image tower; relative error =
max over the rows of ``|low - ref| / |ref|`` of the L2-normalised embedding, ranges over the three batches; "float16
storage" = the same error of the fp32 embedding rounded to float16, which a teacher cache stores anyway:

    model                              precision  rel. L2 error      min cosine   float16 storage   ratio
    ViT-B-16, random weights           fp16       1.33e-3 - 1.34e-3  0.9999990    2.2e-4 - 2.3e-4   5.8-6.0x
    ViT-B-16, random weights           bf16       9.96e-3 - 1.05e-2  0.9999450    2.2e-4 - 2.3e-4   44-46x
    pand-fmnist-clip (shipped weights) fp16       4.9e-4 - 6.0e-4    0.9999998    2.4e-4 - 2.6e-4   1.9-2.5x
    pand-fmnist-clip (shipped weights) bf16       5.4e-3 - 6.2e-3    0.9999809    2.4e-4 - 2.6e-4   22-26x

So fp16 agrees with fp32 to a few times (2-6x) float16 storage's own error, while bf16 does NOT agree to storage
precision: its 8-bit mantissa makes it agree to about 1 % (20-45x the storage error), min cosine ~0.99995. The
default tolerance 0.02 admits both, with about 2x headroom over bf16's worst; set it lower (e.g. 3e-3) to admit fp16
only. fp32 is the default everywhere and is never compared (it is the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from pand.errors import ConfigError, PrecisionError, suggest
from pand.rules import POSITIVE, choice

if TYPE_CHECKING:  # torch is imported where it is used: the config validation imports this module without it
    import torch

__all__ = ["DEFAULT_TOLERANCE", "PRECISIONS", "AgreementProbe", "check_agreement", "check_precision",
           "measure_agreement", "teacher_autocast"]

#: The teacher precisions pand offers; fp32 (the first) is the default and the reference.
PRECISIONS = ("fp32", "bf16", "fp16")
#: The option rules of a ``*.precision`` / ``*.precision_tolerance`` setting (the config checks of every command).
PRECISION_RULE = choice(*PRECISIONS)
TOLERANCE_RULE = POSITIVE
#: Largest relative L2 error of any probe row accepted by default: ~2x bf16's measured worst (about 1 %).
DEFAULT_TOLERANCE = 0.02


def check_precision(precision: Any, setting: str = "precision") -> str:
    """``precision`` if it names one of :data:`PRECISIONS`; else a :class:`ConfigError` naming ``setting``."""
    if precision not in PRECISIONS:
        hint = suggest(str(precision), PRECISIONS) if isinstance(precision, str) else ""
        raise ConfigError(f"{setting}={precision!r} is not allowed: expected one of "
                          f"{', '.join(map(repr, PRECISIONS))}{hint}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32: no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[check_precision(precision)]


def teacher_autocast(device: str | torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``precision``'s dtype; a no-op context for fp32.

    CPU autocast supports both bf16 and fp16 (torch >= 2.x); an unknown precision is a :class:`ConfigError`.
    """
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    device_type = torch.device(device).type
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        raise ConfigError(f"precision={precision} needs torch.autocast on the {device_type} device, which this torch "
                          "does not offer; use precision=fp32")
    return torch.autocast(device_type, dtype=dtype)


def measure_agreement(reference_fp32: torch.Tensor, low: torch.Tensor) -> dict[str, Any]:
    """How far ``low`` ([B, D], a low-precision pass) is from ``reference_fp32`` ([B, D], the same rows in fp32).

    Plain, JSON-able numbers:

    * ``max_rel_error``: max over rows of ``|low - ref| / |ref|`` (L2 norms);
    * ``min_cosine``: min over rows of the cosine between ``low`` and ``ref``;
    * ``max_abs_error``: max over all entries of ``|low - ref|``;
    * ``float16_storage_rel_error``: the ``max_rel_error`` of ``ref`` rounded to float16 (the error the teacher cache's
      own float16 storage makes), and ``ratio_to_float16_storage``: ``max_rel_error`` over it (None if it is 0);
    * ``rows``: B; ``nonfinite``: how many entries of ``low`` are NaN or infinite (the errors above are then NaN or
      infinite, and :func:`check_agreement` refuses the pass).
    """
    import torch
    import torch.nn.functional as F

    ref = torch.as_tensor(reference_fp32).detach().float().cpu()
    out = torch.as_tensor(low).detach().float().cpu()
    if ref.dim() != 2 or ref.shape != out.shape:
        raise ValueError(f"measure_agreement compares two [B, D] tensors of one shape, got {tuple(ref.shape)} and "
                         f"{tuple(out.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("measure_agreement needs at least one row")
    norm = ref.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    rel = (out - ref).norm(dim=1) / norm
    storage = (ref.half().float() - ref).norm(dim=1) / norm
    max_rel, max_storage = float(rel.max()), float(storage.max())
    nonfinite = int((~torch.isfinite(out)).sum())
    return {
        "max_rel_error": max_rel,
        "min_cosine": float(F.cosine_similarity(out, ref, dim=1).min()),
        "max_abs_error": float((out - ref).abs().max()),
        "float16_storage_rel_error": max_storage,
        "ratio_to_float16_storage": max_rel / max_storage if max_storage > 0 else None,
        "rows": int(ref.shape[0]),
        "nonfinite": nonfinite,
    }


def check_agreement(stats: Mapping[str, Any], tolerance: float, what: str, *, precision: str | None = None,
                    setting: str | None = None) -> None:
    """Refuse (:class:`~pand.errors.PrecisionError`) a low-precision pass whose :func:`measure_agreement` ``stats``
    exceed ``tolerance`` (max relative L2 error of a row) or that produced NaN / infinite values, whatever the
    tolerance. ``what`` names the pass; ``setting`` (e.g. ``"cache"``) names its config section for the advice."""
    name = precision or "low-precision"
    prefix = f"{setting}." if setting else ""
    advice = (f"Use {prefix}precision=fp32 (exact), {prefix}precision=fp16 (typically 2-6x float16 storage's own "
              f"error), or raise {prefix}precision_tolerance knowingly (bf16 agrees with fp32 to about 1 %).")
    if stats.get("nonfinite"):
        raise PrecisionError(f"{what}: the {name} pass gave {stats['nonfinite']} NaN or infinite values on the probe "
                             f"batch of {stats.get('rows')} rows, which the fp32 pass does not; {advice}")
    err = stats["max_rel_error"]
    if not err <= tolerance:  # NaN is refused too
        ratio = stats.get("ratio_to_float16_storage")
        times = f", the {name} pass {ratio:.1f}x that" if ratio is not None else ""
        raise PrecisionError(
            f"{what}: the {name} pass does not agree with fp32 on the probe batch of {stats.get('rows')} rows: max "
            f"relative L2 error {err:.3g} > tolerance {prefix}precision_tolerance={tolerance:g} (min cosine "
            f"{stats['min_cosine']:.7f}, max abs error {stats['max_abs_error']:.3g}; float16 storage alone makes "
            f"{stats['float16_storage_rel_error']:.3g}{times}). {advice}")


class AgreementProbe:
    """Runs the batches of one teacher pass in ``precision`` and checks the first one against fp32.

    Call it with ``compute(precision_name) -> Tensor[B, D]`` for each batch (``compute`` wraps its own
    :func:`teacher_autocast`); it returns the low-precision result. On the first call it also computes the fp32
    result, measures, checks (refusing before the caller stores anything) and keeps the stats in :attr:`stats`
    (with ``precision`` and ``tolerance``); later batches are checked for NaN / infinite values only. For fp32 it
    only calls ``compute("fp32")`` and :attr:`stats` stays None.
    """

    def __init__(self, precision: str = "fp32", tolerance: float = DEFAULT_TOLERANCE, *, what: str,
                 setting: str | None = None) -> None:
        self.precision = check_precision(precision, f"{setting}.precision" if setting else "precision")
        tolerance = float(tolerance)
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ConfigError(f"{setting + '.' if setting else ''}precision_tolerance={tolerance!r} is not allowed: "
                              "expected a number > 0")
        self.tolerance = tolerance
        self.what = what
        self.setting = setting
        self.stats: dict[str, Any] | None = None

    @property
    def low(self) -> bool:
        return self.precision != "fp32"

    def __call__(self, compute: Callable[[str], torch.Tensor]) -> torch.Tensor:
        import torch

        if not self.low:
            return compute("fp32")
        out = compute(self.precision)
        if self.stats is None:
            stats = measure_agreement(compute("fp32"), out)
            check_agreement(stats, self.tolerance, self.what, precision=self.precision, setting=self.setting)
            self.stats = {"precision": self.precision, "tolerance": self.tolerance, **stats}
        elif not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise PrecisionError(f"{self.what}: the {self.precision} pass gave {bad} NaN or infinite values in a later "
                                 f"batch (the probe batch agreed with fp32); use "
                                 f"{self.setting + '.' if self.setting else ''}precision=fp32")
        return out
