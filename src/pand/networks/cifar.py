"""The CIFAR networks of the 32-px knowledge-distillation protocol (the CRD / mdistiller tables).

Neither timm nor torchvision has these small networks, so pand defines them here, written from the papers:

* CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2): depth ``6n + 2``;
  a 3x3 conv stem with 16 channels and no max-pool, three stages of ``n`` basic blocks with widths 16, 32, 64 and
  strides 1, 2, 2, global average pooling and a linear classifier. Where a block changes the shape, its shortcut is
  a projection (1x1 conv + BN). ``resnet8x4`` and ``resnet32x4`` are the four-times-wider variants of the KD
  literature: stem 32 channels, stages 64, 128, 256.
* Wide ResNets WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", 2016): a 3x3 conv stem with 16 channels,
  three stages of ``(d - 4) / 6`` pre-activation basic blocks with widths 16k, 32k, 64k and strides 1, 2, 2, then a
  final BN-ReLU, global average pooling and a linear classifier.

Every model keeps its parts as named children, ``stem``, ``stage1``, ``stage2``, ``stage3``, (``final_act`` for the
WRNs), ``pool`` (pooling and flattening: its output is the pooled B x d feature) and ``fc``, and its ``forward``
calls them in that order and returns logits. Stage features can therefore be read with forward hooks
(:class:`pand.networks.stages.StageTap`) or with ``torchvision.models.feature_extraction``, by those names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pand.errors import ConfigError

__all__ = ["CifarResNet", "CifarWideResNet", "create_cifar_model", "is_cifar_model", "list_cifar_models"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block of the WRNs: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    Where the shape changes the shortcut is a 1x1 conv of the activated input, as in the WRN paper.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU()
        self.project = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False) if self.project else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.relu(self.bn2(out)))
        skip = self.shortcut(act) if self.shortcut is not None else x
        return out + skip


def _stage(block: Callable[[int, int, int], nn.Module], in_channels: int, out_channels: int, blocks: int,
           stride: int) -> nn.Sequential:
    layers = [block(in_channels, out_channels, stride)]
    layers += [block(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """CIFAR ResNet: stem conv3x3-BN-ReLU, three stages of ``blocks`` basic blocks, pooling, linear.

    ``widths`` is (stem, stage1, stage2, stage3): (16, 16, 32, 64) for resnet20 etc., (32, 64, 128, 256) for the x4s.
    """

    def __init__(self, blocks: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100) -> None:
        super().__init__()
        if blocks < 1 or len(widths) != 4:
            raise ConfigError(f"a CIFAR ResNet needs >= 1 block per stage and 4 widths, got {blocks}, {widths}")
        stem, w1, w2, w3 = widths
        self.stem = nn.Sequential(_conv3x3(3, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        self.stage1 = _stage(BasicBlock, stem, w1, blocks, 1)
        self.stage2 = _stage(BasicBlock, w1, w2, blocks, 2)
        self.stage3 = _stage(BasicBlock, w2, w3, blocks, 2)
        self.pool = _pool()
        self.fc = nn.Linear(w3, num_classes)
        self.num_features = w3
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return self.fc(self.pool(x))


class CifarWideResNet(nn.Module):
    """WRN-depth-k: stem conv3x3 (16 channels), three stages of pre-activation blocks, BN-ReLU, pooling, linear."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10 or widen < 1:
            raise ConfigError(f"a WRN needs depth = 6n + 4 (n >= 1) and widen >= 1, got depth {depth}, k {widen}")
        blocks = (depth - 4) // 6
        w1, w2, w3 = 16 * widen, 32 * widen, 64 * widen
        self.stem = _conv3x3(3, 16)
        self.stage1 = _stage(PreActBlock, 16, w1, blocks, 1)
        self.stage2 = _stage(PreActBlock, w1, w2, blocks, 2)
        self.stage3 = _stage(PreActBlock, w2, w3, blocks, 2)
        self.final_act = nn.Sequential(nn.BatchNorm2d(w3), nn.ReLU(inplace=True))
        self.pool = _pool()
        self.fc = nn.Linear(w3, num_classes)
        self.num_features = w3
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.final_act(x)
        return self.fc(self.pool(x))


def _resnet(depth: int, widths: Sequence[int] = (16, 16, 32, 64)) -> Callable[[int], nn.Module]:
    blocks = (depth - 2) // 6
    return lambda num_classes: CifarResNet(blocks, widths, num_classes)


def _wrn(depth: int, widen: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarWideResNet(depth, widen, num_classes)


# name -> builder(num_classes). resnet{6n+2}: widths 16/32/64; the x4s: stem 32, stages 64/128/256; wrn_{d}_{k}.
_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": _resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet(32, (32, 64, 128, 256)),
    **{f"wrn_{d}_{k}": _wrn(d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10))},
}


def list_cifar_models() -> list[str]:
    """The names :func:`create_cifar_model` knows, e.g. ``resnet8x4``, ``resnet32x4``, ``resnet56``, ``wrn_40_2``."""
    return sorted(_REGISTRY)


def is_cifar_model(name: str) -> bool:
    return name in _REGISTRY


def create_cifar_model(name: str, num_classes: int = 100) -> nn.Module:
    """A freshly initialised CIFAR network ``name`` whose ``forward`` returns ``num_classes`` logits."""
    build = _REGISTRY.get(name)
    if build is None:
        raise ConfigError(f"{name!r} is not one of pand's CIFAR networks; known: {', '.join(list_cifar_models())}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return build(num_classes)
