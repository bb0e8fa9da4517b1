"""OFA-KD's exit branches: small training-only heads that turn an intermediate student stage into class logits.

OFA applies its loss at every chosen stage, so each stage needs a path to logits. A branch first brings the stage
down to the resolution of the student's final stage, the way the network itself would (stride-2 convolutions for a
CNN map, 2 x 2 patch merging for ViT/MLP tokens), then pools and classifies:

- CNN map ``[B, C, H, W]``: stride-2 depthwise-separable blocks until ``H, W <= target``, global average pool, linear.
- Tokens ``[B, N, C]``: patch grid, 2 x 2 merges until the grid is ``<= target``, ``depth`` pre-norm transformer
  blocks, mean pool, LayerNorm, linear.

Every size comes from the feature shape the caller found with a dry run at the run's real input size, so the same
code serves 32-px CIFAR features and 224-px ImageNet ones; nothing here knows any architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pand.losses import token_grid_side

#: Grid side the token branch merges down to when no target is given (OFA's 7 x 7 at 224 px).
DEFAULT_TOKEN_TARGET = 7


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def _halve(n: int) -> int:
    # the output side of a 3x3 stride-2 convolution with padding 1, and of a 2x2 merge after padding to even
    return (n + 1) // 2


def _num_heads(width: int) -> int:
    """Attention heads of width ~64 each (at least one), a count that divides ``width``."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _separable_block(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise 3x3 stride 2 + BN + ReLU, then pointwise 1x1 + BN + ReLU: halves H and W, maps C_in -> C_out."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),  # BN follows: no bias
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvExitBranch(nn.Module):
    """Exit branch for a CNN stage ``[B, C, H, W]`` built for ``in_hw = (H, W)``.

    Adds stride-2 separable blocks until both sides are at most ``target_hw``; each block outputs ``embed_dim``
    channels if given, else twice its input (as CNN stages double the width when they halve the resolution). Then
    global average pooling and a linear layer to ``num_classes``. Any later input with ``C`` channels is accepted;
    the block count was fixed at construction.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, in_hw: int | Sequence[int], target_hw: int | Sequence[int],
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        (h, w), (th, tw) = _pair(in_hw, "in_hw"), _pair(target_hw, "target_hw")
        self.in_channels = int(in_channels)
        blocks, c = [], self.in_channels
        while h > th or w > tw:
            c_out = int(embed_dim) if embed_dim else 2 * c
            blocks.append(_separable_block(c, c_out))
            c, h, w = c_out, _halve(h), _halve(w)
        self.blocks = nn.Sequential(*blocks)
        self.out_hw = (h, w)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"this branch takes [B, {self.in_channels}, H, W] maps, got shape {tuple(x.shape)}")
        return self.head(self.blocks(x).mean(dim=(2, 3)))


class PatchMerge(nn.Module):
    """Swin-style 2 x 2 patch merging of a ``[B, s, s, C]`` grid into ``[B, ceil(s/2), ceil(s/2), out_dim]``.

    The four tokens of each 2 x 2 window are concatenated (4C), layer-normalised (stage outputs come at arbitrary
    scales) and linearly mapped to ``out_dim``. An odd grid is zero-padded on the right and bottom first.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def _transformer_block(width: int) -> nn.TransformerEncoderLayer:
    # dropout 0: the branch's output should be a function of its input, and OFA's loss already regularises it
    return nn.TransformerEncoderLayer(
        width, _num_heads(width), dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True,
        norm_first=True,
    )


class TokenExitBranch(nn.Module):
    """Exit branch for ViT/MLP tokens ``[B, N, C]`` built for ``N`` tokens of width ``C``.

    The tokens are a square patch grid, optionally after prefix tokens: ``prefix_tokens=None`` detects none or one
    class token from ``N`` (see :func:`pand.losses.token_grid_side`); pass it for other layouts (a distillation
    token, registers). Prefix tokens are dropped: merging needs the grid, and the final mean pool takes over the
    class token's summarising role. 2 x 2 merges (each to ``embed_dim`` if given, else twice the width) run until
    the grid side is at most ``target_hw``; if there are none and ``embed_dim`` differs from ``C``, a linear layer
    sets the width. Then ``depth`` standard pre-norm transformer blocks, mean pooling over the tokens, LayerNorm and
    a linear layer to ``num_classes``.
    """

    def __init__(
        self, num_tokens: int, dim: int, num_classes: int, *, target_hw: int | Sequence[int] = DEFAULT_TOKEN_TARGET,
        embed_dim: int | None = None, depth: int = 1, prefix_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if int(depth) < 0:
            raise ValueError(f"depth must be >= 0 transformer blocks, got {depth}")
        self.num_tokens, self.dim = int(num_tokens), int(dim)
        self.side, self.prefix = token_grid_side(self.num_tokens, prefix_tokens)
        target = min(_pair(target_hw, "target_hw"))  # the grid is square
        merges, side, width = [], self.side, self.dim
        while side > target:
            out = int(embed_dim) if embed_dim else 2 * width
            merges.append(PatchMerge(width, out))
            side, width = _halve(side), out
        self.merges = nn.Sequential(*merges)
        self.project = nn.Linear(width, int(embed_dim)) if embed_dim and width != int(embed_dim) else nn.Identity()
        width = int(embed_dim) if embed_dim else width
        self.blocks = nn.Sequential(*(_transformer_block(width) for _ in range(int(depth))))
        self.out_side = side
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_tokens or x.shape[2] != self.dim:
            raise ValueError(f"this branch takes tokens [B, {self.num_tokens}, {self.dim}], got shape {tuple(x.shape)}")
        grid = x[:, self.prefix:].reshape(x.shape[0], self.side, self.side, self.dim)  # row-major patches
        tokens = self.project(self.merges(grid)).flatten(1, 2)
        return self.head(self.norm(self.blocks(tokens).mean(dim=1)))


def build_exit_branch(
    feature_shape: Sequence[int], num_classes: int, *, target_hw: int | Sequence[int], embed_dim: int | None = None,
    depth: int = 1, prefix_tokens: int | None = None,
) -> ConvExitBranch | TokenExitBranch:
    """The exit branch for a stage whose feature has ``feature_shape``, batch dimension included.

    ``[B, C, H, W]`` (4-D) gives a :class:`ConvExitBranch`, ``[B, N, C]`` (3-D) a :class:`TokenExitBranch`; the batch
    size ``B`` is ignored (any value, e.g. 1 from a dry run). ``target_hw`` is the spatial size of the student's final
    stage (an int or ``(H, W)``), which the branch reduces the stage to. ``depth`` (transformer blocks) and
    ``prefix_tokens`` apply to token branches only; ``embed_dim`` to both.
    """
    shape = tuple(int(s) for s in feature_shape)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if embed_dim is not None and int(embed_dim) < 1:
        raise ValueError(f"embed_dim must be positive, got {embed_dim}")
    if any(s < 1 for s in shape):
        raise ValueError(f"feature shape {shape} has an empty dimension")
    if len(shape) == 4:
        return ConvExitBranch(shape[1], num_classes, in_hw=shape[2:], target_hw=target_hw, embed_dim=embed_dim)
    if len(shape) == 3:
        return TokenExitBranch(shape[1], shape[2], num_classes, target_hw=target_hw, embed_dim=embed_dim,
                               depth=depth, prefix_tokens=prefix_tokens)
    raise ValueError(f"feature shape {shape} is neither a CNN map [B, C, H, W] nor tokens [B, N, C] "
                     "(give the shape with its batch dimension)")
