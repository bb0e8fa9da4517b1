"""Replayable training augmentations and deterministic evaluation transforms.

Distillation feeds the *same* augmented view to the frozen teacher and to the
student.  To cache the teacher's output per augmented view we store only the
augmentation **parameters** and rebuild the exact same image from them later.
Therefore:

* every random draw of :class:`ReplayableAugment` is an explicit entry of a
  float32 parameter vector, drawn from an explicit :class:`torch.Generator`
  (:meth:`ReplayableAugment.sample`);
* :meth:`ReplayableAugment.apply` is a pure, deterministic function of
  ``(image, params)``: the same params give a bit-identical tensor (on the same
  machine / library versions);
* :func:`view_generator` derives an independent, reproducible generator per
  ``(seed, epoch, index)`` so that a view can be re-drawn without replaying the
  whole data stream.

The recipe follows the training defaults of VL2Lite (Jang, Ma and Lee, "VL2Lite: Task-Specific Knowledge
Distillation from Large Vision-Language Models to Lightweight Networks", CVPR 2025), parameterised::

    Resize(short side -> resize_size) -> RandomCrop(image_size)
    -> random square crop of side s in [min_crop_frac*image_size, image_size],
       resized back to image_size
    -> RandomRotation(+-degrees)  (nearest, fill 0, like torchvision's default)
    -> GaussianBlur(sigma ~ U[sigma_min, sigma_max], fixed odd kernel)
    -> ColorJitter(brightness, contrast, saturation, hue; random op order)
    -> horizontal flip with probability flip_p
    -> float in [0, 1] -> Normalize(mean, std)

Why not torchvision's random transforms: they draw from the global generator and keep no record of what they drew,
so a view could not be rebuilt from stored values. The operations themselves are torchvision's functional ones
(``torchvision.transforms.v2.functional``); only the drawing of their parameters is pand's.

Implementation: PIL -> uint8 tensor once; the resize / crop steps run on uint8
(fast antialiased kernel); everything after the crops runs on float32 in
[0, 1] (no intermediate re-quantisation), then normalisation. The tensor
operations pand writes itself (conversion, short-side resize, blur, hue,
normalisation) live in :mod:`pand.data.image_ops`, shared with
:mod:`pand.data.device_augment` and the decoded-image cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pand.data.image_ops import adjust_hue, gaussian_blur, normalize_float, resize_short, resized_hw, to_uint8_chw

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AugmentConfig",
    "ReplayableAugment",
    "view_generator",
    "eval_transform",
    "denormalize",
    "default_blur_kernel",
    "image_hw",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Bump when the meaning of the parameters or the image pipeline changes in a way
#: that alters outputs; part of :meth:`ReplayableAugment.describe`.
TRANSFORM_VERSION = "1"

# Colour-jitter op indices used in the ``jitter_order_*`` parameters.
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")


# --------------------------------------------------------------------------- helpers


def default_blur_kernel(image_size: int) -> int:
    """About 10% of ``image_size``, made odd, at least 3 (224 -> 23)."""
    k = int(round(0.1 * image_size))
    if k % 2 == 0:
        k += 1
    return max(3, k)


def image_hw(image: PIL.Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of a PIL image or a ``[C, H, W]`` tensor (what :meth:`ReplayableAugment.sample` needs)."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AugmentConfig:
    """Configuration of :class:`ReplayableAugment` (VL2Lite training defaults).

    Disable stages with ``degrees=0``, ``blur=False``, jitter factors ``0``,
    ``flip_p=0`` and ``min_crop_frac=1``.  ``resize_size`` must be
    ``>= image_size``.
    """

    image_size: int = 224
    resize_size: int = 256
    min_crop_frac: float = 192 / 224
    degrees: float = 60.0
    blur: bool = True
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None  # None -> default_blur_kernel(image_size)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    flip_p: float = 0.5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML/JSON) for the tuple fields; keep the object hashable.
        for name in ("blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if int(self.image_size) != self.image_size or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size}")
        if int(self.resize_size) != self.resize_size or self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be an int >= image_size ({self.image_size})")
        if not (0.0 < self.min_crop_frac <= 1.0):
            raise ValueError(f"min_crop_frac must be in (0, 1], got {self.min_crop_frac}")
        if not (0.0 <= self.degrees <= 180.0):
            raise ValueError(f"degrees must be in [0, 180], got {self.degrees}")
        if len(self.blur_sigma) != 2 or not (0.0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")
        if self.blur_kernel is not None:
            k = self.blur_kernel
            if int(k) != k or k < 1 or k % 2 == 0:
                raise ValueError(f"blur_kernel must be a positive odd int, got {k}")
            if k // 2 >= self.image_size:
                raise ValueError(f"blur_kernel ({k}) too large for image_size {self.image_size}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0.0 <= self.hue <= 0.5):
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not (0.0 <= self.flip_p <= 1.0):
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("mean/std must have 3 entries and std must be positive")

    @property
    def effective_blur_kernel(self) -> int:
        return self.blur_kernel if self.blur_kernel is not None else default_blur_kernel(self.image_size)

    @property
    def min_crop_size(self) -> int:
        """Smallest side of the second (zoom) crop, in pixels of the image_size crop."""
        return min(self.image_size, max(1, math.ceil(self.min_crop_frac * self.image_size - 1e-9)))


# --------------------------------------------------------------------------- augment


class ReplayableAugment:
    """VL2Lite training augmentation with explicit, replayable parameters.

    ``PARAM_NAMES`` (index: meaning, range):

    ==  ==================  ===================================================
     0  ``crop_top``        RandomCrop top offset in the resized image, int in
                            ``[0, H' - image_size]``
     1  ``crop_left``       RandomCrop left offset, int in ``[0, W' - image_size]``
     2  ``zoom_size``       side ``s`` of the second square crop, int in
                            ``[ceil(min_crop_frac*image_size), image_size]``
     3  ``zoom_top``        its top offset inside the first crop, int in ``[0, image_size - s]``
     4  ``zoom_left``       its left offset, int in ``[0, image_size - s]``
     5  ``angle``           rotation in degrees (counter-clockwise), ``[-degrees, degrees]``
     6  ``blur_sigma``      Gaussian sigma, ``[sigma_min, sigma_max]``; ``0`` = no blur
     7  ``brightness``      factor in ``[max(0, 1-b), 1+b]``; 1 = identity
     8  ``contrast``        factor in ``[max(0, 1-c), 1+c]``; 1 = identity
     9  ``saturation``      factor in ``[max(0, 1-s), 1+s]``; 1 = identity
    10  ``hue``             shift in ``[-h, h]``; 0 = identity
    11  ``jitter_order_0``  the 4 jitter ops (0 brightness, 1 contrast,
    ..                      2 saturation, 3 hue) in the order applied; a
    14  ``jitter_order_3``  permutation of 0..3
    15  ``flip``            1 = horizontal flip, 0 = none
    ==  ==================  ===================================================

    ``(H', W')`` is the original image size after resizing its short side to
    ``resize_size`` (:func:`~pand.data.image_ops.resized_hw`).  All integer entries are exact
    integers stored in float32.
    """

    PARAM_NAMES: tuple[str, ...] = (
        "crop_top",
        "crop_left",
        "zoom_size",
        "zoom_top",
        "zoom_left",
        "angle",
        "blur_sigma",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "jitter_order_0",
        "jitter_order_1",
        "jitter_order_2",
        "jitter_order_3",
        "flip",
    )
    VERSION = TRANSFORM_VERSION

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config if config is not None else AugmentConfig()
        self.num_params = len(self.PARAM_NAMES)
        self.blur_kernel = self.config.effective_blur_kernel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # ------------------------------------------------------------------ params

    def identity_params(self, image_hw: tuple[int, int]) -> torch.Tensor:
        """Parameters of the 'no augmentation' view: centre crop (same offsets as
        ``CenterCrop``), no zoom, no rotation/blur/jitter/flip."""
        cfg = self.config
        rh, rw = resized_hw(image_hw, cfg.resize_size)
        top = int(round((rh - cfg.image_size) / 2.0))
        left = int(round((rw - cfg.image_size) / 2.0))
        vals = [top, left, cfg.image_size, 0, 0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0, 1, 2, 3, 0]
        return torch.tensor(vals, dtype=torch.float32)

    def sample(self, generator: torch.Generator, image_hw: tuple[int, int]) -> torch.Tensor:
        """Draw one parameter vector (float32 ``[num_params]``) from ``generator``.

        ``image_hw`` is the ``(H, W)`` of the ORIGINAL image.  The draws use
        only ``generator`` (never the global RNG).
        """
        cfg = self.config
        g = generator
        size = cfg.image_size
        rh, rw = resized_hw(image_hw, cfg.resize_size)

        def randint(lo: int, hi: int) -> int:  # inclusive
            if hi <= lo:
                return lo
            return int(torch.randint(lo, hi + 1, (1,), generator=g).item())

        def uniform(lo: float, hi: float) -> float:
            if hi <= lo:
                return float(lo)
            return float(torch.empty(1, dtype=torch.float64).uniform_(lo, hi, generator=g).item())

        crop_top = randint(0, rh - size)
        crop_left = randint(0, rw - size)
        zoom_size = randint(cfg.min_crop_size, size)
        zoom_top = randint(0, size - zoom_size)
        zoom_left = randint(0, size - zoom_size)
        angle = uniform(-cfg.degrees, cfg.degrees) if cfg.degrees > 0 else 0.0
        sigma = uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]) if cfg.blur else 0.0
        factors = []
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(cfg, name)
            factors.append(uniform(max(0.0, 1.0 - v), 1.0 + v) if v > 0 else 1.0)
        hue = uniform(-cfg.hue, cfg.hue) if cfg.hue > 0 else 0.0
        order = torch.randperm(4, generator=g).tolist()
        flip = 0
        if cfg.flip_p > 0:
            flip = int(torch.rand(1, generator=g, dtype=torch.float64).item() < cfg.flip_p)

        vals = [crop_top, crop_left, zoom_size, zoom_top, zoom_left, angle, sigma, *factors, hue, *order, flip]
        # float32 rounding is monotonic, so every entry stays within the
        # float32-rounded bounds of its range.
        return torch.tensor(vals, dtype=torch.float32)

    # ------------------------------------------------------------------ apply

    def _check_params(self, params: torch.Tensor) -> list[float]:
        if not isinstance(params, torch.Tensor):
            params = torch.as_tensor(params)
        if params.shape != (self.num_params,):
            raise ValueError(f"params must have shape [{self.num_params}], got {tuple(params.shape)}")
        # Only the float32-rounded values are ever used.
        return params.detach().to("cpu", torch.float32).tolist()

    def window(self, image: PIL.Image.Image | torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The view's zoom window of ``image``: uint8 ``[3, s, s]`` (``s`` = ``zoom_size``), before any arithmetic on
        pixels. RandomCrop followed by the zoom crop is one crop of the short-side-resized image. Raises
        ``ValueError`` if the crop parameters do not fit the image (e.g. params sampled for another image)."""
        size = self.config.image_size
        v = self._check_params(params)
        crop_top, crop_left, zoom_size, zoom_top, zoom_left = (int(x) for x in v[0:5])
        if not (size >= zoom_size >= 1 and 0 <= zoom_top <= size - zoom_size and 0 <= zoom_left <= size - zoom_size):
            raise ValueError(f"invalid zoom crop params {v[2:5]} for image_size {size}")
        x = resize_short(to_uint8_chw(image), self.config.resize_size)
        rh, rw = x.shape[-2:]
        if not (0 <= crop_top <= rh - size and 0 <= crop_left <= rw - size):
            raise ValueError(
                f"crop offsets ({crop_top}, {crop_left}) do not fit a resized image of {rh}x{rw}; "
                "were the params sampled for a different image size?"
            )
        top, left = crop_top + zoom_top, crop_left + zoom_left
        return x[:, top : top + zoom_size, left : left + zoom_size]

    def apply(self, image: PIL.Image.Image | torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Apply the augmentation described by ``params`` to ``image``.

        Returns a normalised float32 tensor ``[3, image_size, image_size]``.
        Pure and deterministic.  ``image`` is a PIL image (any mode, converted to
        RGB) or a uint8 tensor ``[C,H,W]``.  Raises ``ValueError`` if the crop
        parameters do not fit the image (e.g. params sampled for another image).
        """
        cfg = self.config
        size = cfg.image_size
        v = self._check_params(params)
        angle, sigma = v[5], v[6]
        jitter = {"brightness": v[7], "contrast": v[8], "saturation": v[9], "hue": v[10]}
        order = [int(x) for x in v[11:15]]
        flip = v[15]
        if sorted(order) != [0, 1, 2, 3]:
            raise ValueError(f"jitter order must be a permutation of 0..3, got {order}")
        x = self.window(image, params)
        if x.shape[-1] != size:
            x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        x = x.to(torch.float32).div_(255.0)

        if angle != 0.0:
            x = TF.rotate(x, angle, interpolation=InterpolationMode.NEAREST, expand=False, fill=None)
        if sigma > 0.0:
            x = gaussian_blur(x, self.blur_kernel, sigma)
        for op in order:
            name = JITTER_OPS[op]
            f = jitter[name]
            if name == "brightness" and f != 1.0:
                x = TF.adjust_brightness(x, f)
            elif name == "contrast" and f != 1.0:
                x = TF.adjust_contrast(x, f)
            elif name == "saturation" and f != 1.0:
                x = TF.adjust_saturation(x, f)
            elif name == "hue" and f != 0.0:
                x = adjust_hue(x, f)
        if flip >= 0.5:
            x = x.flip(-1)
        x = x.contiguous()
        return normalize_float(x, cfg.mean, cfg.std)

    def __call__(
        self, image: PIL.Image.Image | torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample params for ``image`` from ``generator`` and apply them: ``(view, params)``."""
        p = self.sample(generator, image_hw(image))
        return self.apply(image, p), p

    # ------------------------------------------------------------------ identity

    def describe(self) -> dict:
        """JSON-able description; two augmenters with equal descriptions produce
        equal outputs from equal params (used to validate caches)."""
        cfg = dataclasses.asdict(self.config)
        cfg = {k: (list(val) if isinstance(val, tuple) else val) for k, val in cfg.items()}
        return {
            "class": type(self).__name__,
            "version": self.VERSION,
            "config": cfg,
            "effective_blur_kernel": self.blur_kernel,
            "param_names": list(self.PARAM_NAMES),
            "pipeline": {
                "resize": "short-side bilinear antialias uint8",
                "rotate": "nearest fill=0",
                "blur": "separable gaussian reflect float32",
                "hue": "hsv rotation float32",
                "jitter_ops": list(JITTER_OPS),
            },
        }


# --------------------------------------------------------------------------- misc API


def view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from a blake2b hash of ``(seed, epoch, index)``.

    Deterministic; different triples give (practically) independent streams.
    """
    key = f"pand.view:{int(seed)}:{int(epoch)}:{int(index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    s = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(s)
    return g


def eval_transform(
    image_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Deterministic eval transform: Resize(short side -> resize_size or
    image_size) -> CenterCrop(image_size) -> float [0,1] -> Normalize.

    Uses the same resize/normalise kernels as :class:`ReplayableAugment`, so the
    augmenter's identity params reproduce it exactly.
    """
    size = int(image_size)
    rsize = int(resize_size) if resize_size is not None else size
    if rsize < size:
        raise ValueError(f"resize_size ({rsize}) must be >= image_size ({size})")
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def transform(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
        x = resize_short(to_uint8_chw(image), rsize)
        h, w = x.shape[-2:]
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        x = x[:, top : top + size, left : left + size]
        return normalize_float(x.to(torch.float32).div_(255.0).contiguous(), mean_t, std_t)

    return transform


def denormalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Inverse of Normalize for ``[3,H,W]`` or ``[B,3,H,W]`` tensors (returns a new tensor)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m
