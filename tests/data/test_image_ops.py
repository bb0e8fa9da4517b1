"""Tests for pand.data.image_ops (the tensor image operations shared by the CPU and device augmentations)."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from pand.data.image_ops import adjust_hue, gaussian_blur


def test_gaussian_blur_and_adjust_hue_match_torchvision():
    # the fast blur / hue kernels agree with torchvision's reference ones
    x = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    ref = TF.gaussian_blur(x, [7, 7], [1.3, 1.3])
    assert torch.allclose(gaussian_blur(x, 7, 1.3), ref, atol=1e-5)
    for hf in (-0.5, -0.2, 0.0, 0.05, 0.37, 0.5):
        assert torch.allclose(adjust_hue(x, hf), TF.adjust_hue(x, hf), atol=1e-5), hf
