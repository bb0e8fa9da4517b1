"""Input sizes: an image side as (height, width), and the patch size that a patch-embedding network must tile."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pand.errors import ConfigError


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` (a side or a (height, width) pair) as (height, width)."""
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"an image size is a positive side or a (height, width) pair, got {size!r}")
    return hw  # type: ignore[return-value]


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size of a patch-embedding model (ViT, Mixer, Swin: timm's ``PatchEmbed``, torchvision's ViT)."""
    for module in model.modules():
        if getattr(module, "dynamic_img_pad", False):
            return None  # timm pads such inputs to whole patches: any size tiles
        p = getattr(module, "patch_size", None)
        if isinstance(p, int) and not isinstance(p, bool):
            return p, p
        if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) for v in p):
            return int(p[0]), int(p[1])
    return None
