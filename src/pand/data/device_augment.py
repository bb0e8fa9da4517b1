"""The training augmentation replayed on a batch at once, on any device (``data.augment_on=device``).

:class:`~pand.data.transforms.ReplayableAugment` builds one view at a time on a CPU core: about 5 ms per 224 px view,
most of it rotation, blur and colour jitter in float32. A GPU trains a ResNet-18 faster than a few CPU cores can make
its views. This module splits the same recipe in two:

* the loader's share, :func:`crop_window`: the short-side resize (a no-op with the decoded-image cache) and the
  integer crop of the view's window (``crop`` + ``zoom`` offsets of the params), a memory copy, padded into a fixed
  ``[3, image_size, image_size]`` uint8 tensor so that windows of every size collate;
* the device's share, :class:`BatchedAugment`: zoom resize, rotation, blur, colour jitter in each view's own order,
  flip and normalisation of a whole batch with batched torch ops, every per-view value taken from the params tensor
  (no host round trip, so nothing waits for the GPU).

Both shares compute what :meth:`ReplayableAugment.apply` computes, operation by operation:

* the zoom resize is torch's uint8 antialiased bilinear kernel, emulated in integer arithmetic: the same double
  weights (triangle filter, normalised per output pixel), converted to int16 with the same precision rule, summed
  with the same rounding constant, a horizontal then a vertical pass through a uint8 intermediate; the result is
  bit-identical to the CPU kernel (tested);
* the rotation uses torchvision's inverse affine matrix and pixel grid, sampled with ``grid_sample`` (nearest, zero
  fill) as ``TF.rotate`` does; float rounding of the grid can move a sample that lies within ~1e-5 px of a
  half-pixel boundary to the neighbouring pixel, which happens for a handful of pixels per image, if any;
* blur, jitter, flip and normalisation are the same float32 formulas, batched: equal to ~1e-6 (summation order).

The tests state the tolerance (``tests/data/test_device_augment.py``) and measure what it does to a teacher's
embeddings; a teacher cache built from CPU views therefore serves training with device views and vice versa.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pand.data.image_ops import adjust_hue, gaussian_kernel1d
from pand.data.transforms import JITTER_OPS, AugmentConfig, ReplayableAugment
from pand.rules import AUGMENT_ON

__all__ = ["WINDOW", "BatchedAugment", "DeviceShare", "crop_window", "loader_share"]

#: Where the training views are made: ``cpu`` (per image, in the loader) or ``device`` (per batch, after transfer).
#: The batch key of the uint8 crop windows a loader sends when the views are made on the device.
WINDOW = "window"

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = (JITTER_OPS.index(n) for n in ("brightness", "contrast", "saturation",
                                                                            "hue"))


def crop_window(augment: ReplayableAugment, image: PIL.Image.Image | torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The loader's share of a view: uint8 ``[3, S, S]`` holding the view's zoom window at the top left, zeros after.

    ``S`` is ``image_size``; the window's side is the ``zoom_size`` entry of ``params``. Raises ``ValueError`` for
    params that do not fit the image, as :meth:`ReplayableAugment.apply` does.
    """
    size = augment.config.image_size
    x = augment.window(image, params)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    out[:, : x.shape[-2], : x.shape[-1]] = x
    return out


# --------------------------------------------------------------------------- zoom resize (uint8, integer weights)


def _resize_taps(sizes: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per view: source indices ``[B, out, 2]``, int32 weights ``[B, out, 2]`` and weight precision ``[B]`` of torch's
    uint8 antialiased bilinear resize from ``sizes[b]`` to ``out`` pixels (upsampling: at most 2 taps).

    The arithmetic is the CPU kernel's, in float64: scale ``in / out``, centre ``scale * (i + 0.5)``, support 1 (or
    ``scale`` when shrinking), taps ``trunc(centre -/+ support + 0.5)`` clipped to the image, triangle weights
    normalised by their sum; then the largest precision ``p < 22`` for which ``round(max_weight * 2^(p+1))`` stays
    below ``2^15``, and int16 weights ``trunc(0.5 + w * 2^p)``.
    """
    s = sizes.to(torch.float64).view(-1, 1)
    i = torch.arange(out, dtype=torch.float64, device=sizes.device).view(1, -1)
    scale = s / out  # <= 1: crop_window never makes a window larger than the view
    center = scale * (i + 0.5)
    first = torch.clamp_min(torch.trunc(center - 1.0 + 0.5), 0.0)
    end = torch.minimum(torch.trunc(center + 1.0 + 0.5), s)
    pos = first.unsqueeze(-1) + torch.arange(2, dtype=torch.float64, device=sizes.device)
    valid = pos < end.unsqueeze(-1)
    dist = (pos - center.unsqueeze(-1) + 0.5).abs()
    w = torch.where(valid & (dist < 1.0), 1.0 - dist, torch.zeros_like(dist))
    total = w[..., 0] + w[..., 1]
    w = torch.where(total.unsqueeze(-1) != 0, w / total.unsqueeze(-1), w)
    w_max = w.flatten(1).amax(1, keepdim=True)
    steps = torch.arange(22, dtype=torch.float64, device=sizes.device).view(1, -1)
    big = torch.trunc(0.5 + w_max * torch.exp2(steps + 1)) >= 2**15
    precision = torch.where(big.any(1), big.to(torch.int64).argmax(1), torch.full_like(w_max[:, 0], 22).long())
    w_int = torch.trunc(0.5 + w * torch.exp2(precision.to(torch.float64)).view(-1, 1, 1)).to(torch.int32)
    index = torch.minimum(pos, s.unsqueeze(-1) - 1).clamp_min(0).long()
    return index, w_int, precision.to(torch.int32)


def _resample(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """One pass of the integer resize along the last dim of ``x [B, C, H, W]`` (integer values in a float dtype).

    The taps become a sparse ``[W, out]`` matrix per view and the pass a batched matrix product. Every product and
    partial sum is an integer below 2^24 (pixel <= 255, weights sum to about 2^p with p <= 15), so float32 sums them
    exactly in any order; CUDA gets float64 anyway, which TF32 matmul settings never touch.
    """
    b, c, h, w = x.shape
    out = index.shape[1]
    matrix = torch.zeros(b, w, out, dtype=x.dtype, device=x.device)
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, out, 2)
    column = torch.arange(out, device=x.device).view(1, out, 1).expand(b, out, 2)
    matrix.index_put_((batch, index, column), weight.to(x.dtype), accumulate=True)
    acc = torch.matmul(x.reshape(b, c * h, w), matrix).view(b, c, h, out)
    scale = torch.exp2(-precision.to(x.dtype)).view(b, 1, 1, 1)
    # (acc + 2^(p-1)) >> p, as the kernel rounds; scaling by a power of two is exact
    return (acc + 0.5 / scale).mul_(scale).floor_().clamp_(0, 255)


def _zoom(windows: torch.Tensor, zoom: torch.Tensor, size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 windows (zoom window top-left) -> ``[B, 3, size, size]`` float32 of the CPU kernel's uint8 values.

    ``dtype`` of the sums: float64 on CUDA, float32 elsewhere (both exact)."""
    index, weight, precision = _resize_taps(zoom, size)
    if dtype is None:
        dtype = torch.float64 if windows.device.type == "cuda" else torch.float32
    x = _resample(windows.to(dtype), index, weight, precision)  # horizontal
    x = _resample(x.transpose(-1, -2), index, weight, precision).transpose(-1, -2)  # vertical, through uint8 values
    return x.to(torch.float32)


# --------------------------------------------------------------------------- float ops with per-view values


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour rotation by ``angle`` degrees (counter-clockwise), zero fill: ``TF.rotate`` per view.

    torchvision builds the inverse affine matrix in float64 from ``-(angle mod 360)`` (``[cos, sin, -sin, cos]``),
    rounds it to float32, divides it by half the image size and maps pixel centres ``j + 0.5 - W / 2`` through it.
    """
    b, _, h, w = x.shape
    rad = -(angle.to(torch.float64) % 360.0) * (math.pi / 180.0)
    cos, sin = torch.cos(rad).to(torch.float32), torch.sin(rad).to(torch.float32)
    half_w, half_h = 0.5 * w, 0.5 * h  # exact in float32, as torchvision's divisor tensor
    # rescaled theta^T: rows multiply (x, y, 1)
    r00, r01 = (cos / half_w).view(b, 1, 1), (-sin / half_h).view(b, 1, 1)
    r10, r11 = (sin / half_w).view(b, 1, 1), (cos / half_h).view(b, 1, 1)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device).view(1, 1, w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).view(1, h, 1)
    grid = torch.stack((xs * r00 + ys * r10, xs * r01 + ys * r11), dim=-1)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding and a per-view sigma (the CPU path's kernel and shifts)."""
    b, _, h, w = x.shape
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # views without blur are not used
    weights = gaussian_kernel1d(kernel_size, safe).view(b, kernel_size, 1, 1, 1)
    pad = kernel_size // 2
    xp = F.pad(x, [pad, pad, 0, 0], mode="reflect")
    y = xp[..., 0:w] * weights[:, 0]
    for j in range(1, kernel_size):
        y.addcmul_(xp[..., j : j + w], weights[:, j])
    yp = F.pad(y, [0, 0, pad, pad], mode="reflect")
    out = yp[:, :, 0:h] * weights[:, 0]
    for j in range(1, kernel_size):
        out.addcmul_(yp[:, :, j : j + h], weights[:, j])
    return out


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with one ratio per view."""
    r = ratio.view(-1, 1, 1, 1)
    return x.mul(r).addcmul_(other, 1.0 - r).clamp_(0.0, 1.0)


def _jitter_op(op: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if op == _BRIGHTNESS:
        return lambda x, f: x.mul(f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == _CONTRAST:
        return lambda x, f: _blend(x, TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    if op == _SATURATION:
        return lambda x, f: _blend(x, TF.rgb_to_grayscale(x), f)
    return adjust_hue


def _where(x: torch.Tensor, mask: torch.Tensor, fn: Callable[..., torch.Tensor], *values: torch.Tensor,
           select: bool = True):
    """``fn`` applied to the views selected by ``mask`` (with their rows of ``values``); the others unchanged.

    ``select``: compute only the selected views (on a CPU); otherwise every view is computed and the result chosen
    with ``torch.where``, which needs no host synchronisation (selecting rows would wait for the device to count them).
    """
    if select:
        rows = mask.nonzero().flatten()
        if len(rows) == 0:
            return x
        out = x.clone()
        out[rows] = fn(x[rows], *(v[rows] for v in values))
        return out
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, *values), x)


class BatchedAugment:
    """The device's share of :class:`~pand.data.transforms.ReplayableAugment`, for a whole batch.

    ``augment(windows, params)``: uint8 windows ``[B, 3, S, S]`` from :func:`crop_window` and their float32 params
    ``[B, P]``, on the same device, give the normalised float32 views ``[B, 3, S, S]``, what
    ``ReplayableAugment.apply`` gives for each (see the module docstring for how exactly).
    """

    #: On a CPU compute only the views an operation changes; elsewhere compute all and select (no host sync).
    select_rows_on_cpu = True
    #: Views per slice on a CPU.
    cpu_chunk = 16

    def __init__(self, config: AugmentConfig | ReplayableAugment) -> None:
        self.augment = config if isinstance(config, ReplayableAugment) else ReplayableAugment(config)
        self.config = self.augment.config
        self.blur_kernel = self.augment.blur_kernel
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # made once per device: a host-to-device copy per batch would make the host wait
        if device not in self._on_device:
            cfg = self.config
            self._on_device[device] = (
                torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1).to(device),
                torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1).to(device),
                torch.tensor([1.0, 1.0, 1.0, 0.0]).to(device),  # identity value of each jitter factor
            )
        return self._on_device[device]

    def __call__(self, windows: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if windows.dtype != torch.uint8 or windows.dim() != 4 or tuple(windows.shape[1:]) != (3, size, size):
            raise ValueError(f"windows must be uint8 [B, 3, {size}, {size}], got {windows.dtype} {tuple(windows.shape)}")
        if params.dim() != 2 or params.shape != (windows.shape[0], self.augment.num_params):
            raise ValueError(f"params must be [{windows.shape[0]}, {self.augment.num_params}], got {tuple(params.shape)}")
        params = params.to(device=windows.device, dtype=torch.float32)
        # Exact integer sums in float32 and float32 formulas: a surrounding autocast must not lower them.
        with torch.autocast(windows.device.type, enabled=False):
            if windows.device.type != "cpu" or len(windows) <= self.cpu_chunk:
                return self._views(windows, params)
            # a CPU works through the batch in slices that stay in its caches (measured 8.6 against 12.4 ms per
            # 224 px view for slices of 16 against one slice of 64)
            return torch.cat([self._views(windows[i : i + self.cpu_chunk], params[i : i + self.cpu_chunk])
                              for i in range(0, len(windows), self.cpu_chunk)])

    def _views(self, windows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        mean, std, identity = self._constants(windows.device)
        x = _zoom(windows, p[:, 2].to(torch.int64), size).div_(255.0)
        select = x.device.type == "cpu" and self.select_rows_on_cpu
        x = _where(x, p[:, 5] != 0, _rotate, p[:, 5], select=select)
        x = _where(x, p[:, 6] > 0, lambda v, s: _blur(v, s, self.blur_kernel), p[:, 6], select=select)
        factors = p[:, 7:11]
        order = p[:, 11:15].to(torch.int64)
        for slot in range(4):
            for op in range(4):
                mask = (order[:, slot] == op) & (factors[:, op] != identity[op])
                x = _where(x, mask, _jitter_op(op), factors[:, op], select=select)
        x = _where(x, p[:, 15] >= 0.5, lambda v: v.flip(-1), select=select)
        return x.sub_(mean).div_(std)


def _check_augment_on(augment_on: str) -> None:
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {list(AUGMENT_ON)}, got {augment_on!r}")


def loader_share(augment: ReplayableAugment, augment_on: str) -> Callable[..., torch.Tensor]:
    """What a loader makes of ``(image, params)`` on each path: the float view (``cpu``) or the uint8 crop window
    (``device``). Picklable, so loader worker processes can run it."""
    _check_augment_on(augment_on)
    return functools.partial(crop_window, augment) if augment_on == "device" else augment.apply


class DeviceShare:
    """What the training process makes of a loader batch on ``device``: the views themselves (``cpu``: they only
    move) or the views made from the batch's crop windows (``device``: :class:`BatchedAugment`)."""

    def __init__(self, augment: ReplayableAugment, augment_on: str) -> None:
        _check_augment_on(augment_on)
        self.batched = BatchedAugment(augment) if augment_on == "device" else None

    def __call__(self, pixels: torch.Tensor, params: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        pixels = pixels.to(device, non_blocking=True)
        if self.batched is None:
            return pixels
        return self.batched(pixels, params.to(device, non_blocking=True))
