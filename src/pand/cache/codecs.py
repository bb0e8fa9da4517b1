"""Compact row codecs for teacher outputs: int8 rows with a per-row scale, and bfloat16 rows stored as their bits.

Pure functions on numpy arrays or torch tensors (each returns the kind it is given); the last axis is the row
(an embedding of D values, a logit row of C classes). What each costs the training losses that read the stored values
is measured by ``python benchmarks/cache_output_storage.py`` (figures in ``benchmarks/README.md``, section "Compact
teacher outputs"): neither is negligible next to float16 (bfloat16 has 8-9x its gradient error for the same bytes,
int8 about 20-40x for half the bytes), which is why the cache stores float16 unless a run asks for int8 rows
(``cache.storage=int8``, for corpora whose float16 cache does not fit). float16 rows and top-k logit rows are the
cache's own storages (:func:`pand.cache.teacher.encode_topk`), not repeated here.

int8 rows: ``q = round(x / s)`` with ``s = max|x| / 127`` per row (symmetric, no zero point), decoded as ``q * s``.
The scale is stored in float16 by default (2 bytes per row) and rounded UP to a float16 value, so that every
``|x| / s <= 127``: nothing is clipped and every decoded value is within ``s / 2`` of ``x`` for the stored ``s``. A row
of zeros gets ``s = 0`` and decodes to zeros. Rows whose scale does not fit float16 (``max|x| > 127 * 65504``) are
refused: pass ``scale_dtype=float32``.

bfloat16 rows: the upper 16 bits of the float32 values after round-to-nearest-even, as uint16 (numpy has no
bfloat16); NaN stays NaN. Bit-identical to torch's ``float32 -> bfloat16`` conversion for every value but NaN (whose
bits torch makes canonical).
"""

from __future__ import annotations

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

__all__ = ["INT8_MAX", "decode_bf16_rows", "decode_int8_rows", "encode_bf16_rows", "encode_int8_rows"]

#: The largest magnitude of a stored int8 value: -128 is never used, so the code is symmetric around 0.
INT8_MAX = 127


def _check_rows(x: Array) -> None:
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"expected rows [..., D] with D >= 1, got shape {tuple(x.shape)}")


def _float16_at_least(value: Array) -> Array:
    """float16 of ``value`` (float32, non-negative, finite), rounded up where rounding to nearest went down.

    For a positive finite float16, the next larger one is its bit pattern plus one; torch's float16 has no nextafter.
    """
    if isinstance(value, torch.Tensor):
        half = value.to(torch.float16)
        below = half.float() < value
        return torch.where(below, (half.view(torch.int16) + 1).view(torch.float16), half)
    with np.errstate(over="ignore"):  # a scale beyond float16 becomes infinity, which the caller refuses
        half = value.astype(np.float16)
    below = half.astype(np.float32) < value
    return np.where(below, (half.view(np.uint16) + 1).view(np.float16), half)


def encode_int8_rows(x: Array, scale_dtype=np.float16) -> tuple[Array, Array]:
    """``(q, scale)``: int8 ``[..., D]`` and ``scale_dtype`` ``[..., 1]`` with ``x ~ q * scale`` (see the module).

    ``x`` is read as float32. ``scale_dtype``: float16 (default) or float32, as a numpy or torch dtype. Non-finite
    values are refused: a NaN or an infinity would make the whole row's scale meaningless.
    """
    is_torch = isinstance(x, torch.Tensor)
    half = scale_dtype in (np.float16, torch.float16)
    if not half and scale_dtype not in (np.float32, torch.float32):
        raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
    if is_torch:
        x = x.detach().float()
        _check_rows(x)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("int8 rows need finite values; the input has NaN or infinity")
        scale = x.abs().amax(-1, keepdim=True) / INT8_MAX
    else:
        x = np.asarray(x, dtype=np.float32)
        _check_rows(x)
        if not np.isfinite(x).all():
            raise ValueError("int8 rows need finite values; the input has NaN or infinity")
        scale = np.abs(x).max(-1, keepdims=True) / np.float32(INT8_MAX)
    if half:
        scale = _float16_at_least(scale)
        if not bool((scale <= 65504).all()):  # the float16 maximum: above it the scale became infinite
            raise ValueError("a row's largest value exceeds 127 * 65504, beyond a float16 scale; "
                             "use scale_dtype=float32")
    # Divide by the stored scale (not the exact one), so the error bound holds for what decoding multiplies by.
    if is_torch:
        s = scale.float()
        q = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0).round().clamp_(-INT8_MAX, INT8_MAX)
        return q.to(torch.int8), scale
    s = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, x / np.where(s > 0, s, np.float32(1)), np.float32(0))
    return np.clip(np.rint(q), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def decode_int8_rows(q: Array, scale: Array) -> Array:
    """float32 ``q * scale`` of :func:`encode_int8_rows`'s ``(q, scale)``."""
    if isinstance(q, torch.Tensor):
        return q.float() * torch.as_tensor(scale, device=q.device).float()
    return np.asarray(q).astype(np.float32) * np.asarray(scale).astype(np.float32)


def encode_bf16_rows(x: Array) -> Array:
    """The bfloat16 bits of ``x`` (read as float32, rounded to nearest even): uint16, same shape."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().to(torch.bfloat16).view(torch.uint16)
    values = np.ascontiguousarray(x, dtype=np.float32)
    bits = values.view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits. A NaN could
    # carry into the exponent (or become infinity), so it keeps its upper bits with the quiet bit set instead.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = ((bits >> np.uint32(16)) | np.uint32(0x0040))
    return np.where(np.isnan(values), nan, rounded).astype(np.uint16)


def decode_bf16_rows(bits: Array) -> Array:
    """float32 values of :func:`encode_bf16_rows`'s bits (exact: every bfloat16 is a float32)."""
    if isinstance(bits, torch.Tensor):
        return bits.view(torch.bfloat16).float()
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
