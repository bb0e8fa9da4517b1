"""PAT's training-only building blocks: feature layouts, feedback prompt blocks, region-aware attention, aligners.

Everything here is sized from per-sample feature shapes that the caller found with a dry run at the run's input size;
nothing knows an architecture. Stage features come as pand lays them out (:class:`~pand.networks.stages.StageTap`):
CNN maps ``[B, C, H, W]`` or ViT/MLP tokens ``[B, N, C]`` (optional prefix tokens such as a class token, then a
square patch grid), described by :class:`Layout`. The inputs the prompts rewrite are whatever the teacher passes
between its stages, which may be channels-last maps ``[B, H, W, C]`` (timm's Swin) or sequence-first tokens
``[N, B, C]``; :data:`CHANNELS_LAST` / :data:`SEQUENCE_FIRST` name those orders, and the prompt block converts to
pand's layout and back around its own computation.

Every block works on the ``[B, C, H, W]`` grid view of a feature (patch tokens laid out row-major, prefix tokens set
aside), so the same convolutions serve maps and tokens.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError
from pand.losses import token_grid_side
from pand.networks.stages import CHANNELS_LAST, SEQUENCE_FIRST, to_pand_layout

MAP, TOKENS = "map", "tokens"


def from_pand_order(x: torch.Tensor, order: str | None) -> torch.Tensor:
    """The inverse of :func:`pand.networks.stages.to_pand_layout`."""
    if order == CHANNELS_LAST:
        return x.permute(0, 2, 3, 1)
    if order == SEQUENCE_FIRST:
        return x.transpose(0, 1)
    return x


@dataclass(frozen=True)
class Layout:
    """How a pand-layout per-sample feature shape maps onto a ``C x H x W`` grid."""

    kind: str
    channels: int
    height: int
    width: int
    prefix: int = 0  # leading non-patch tokens (tokens only)

    @classmethod
    def of(cls, shape: Sequence[int]) -> Layout:
        """The layout of a per-sample shape: ``(C, H, W)`` map or ``(N, C)`` tokens."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            n, c = shape
            try:
                side, prefix = token_grid_side(n)
            except ValueError as err:
                raise ConfigError(f"PAT lays tokens out on their patch grid, and {n} tokens do not form one ({err}); "
                                  "choose other stages") from None
            return cls(TOKENS, c, side, side, prefix)
        if len(shape) == 3:
            return cls(MAP, *shape)
        raise ConfigError(f"PAT handles maps (C, H, W) and tokens (N, C); got a stage of per-sample shape {shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape this layout describes."""
        if self.kind == TOKENS:
            return (self.prefix + self.height * self.width, self.channels)
        return (self.channels, self.height, self.width)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape]`` as a ``[B, C, H, W]`` grid (prefix tokens dropped)."""
        if self.kind == TOKENS:
            return x[:, self.prefix:].transpose(1, 2).reshape(x.shape[0], self.channels, self.height, self.width)
        return x

    def from_grid(self, grid: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """A ``[B, C, H, W]`` grid back in this layout; ``prefix`` ``[B, P, C]`` fills the prefix tokens (zeros if
        None)."""
        if self.kind == MAP:
            return grid
        tokens = grid.flatten(2).transpose(1, 2)
        if self.prefix:
            if prefix is None:
                prefix = tokens.new_zeros(tokens.shape[0], self.prefix, self.channels)
            tokens = torch.cat([prefix, tokens], dim=1)
        return tokens


def resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ``[B, C, H, W]`` grid at ``size``: averaged when shrinking on both sides, bilinear otherwise."""
    h, w = int(grid.shape[-2]), int(grid.shape[-1])
    if (h, w) == tuple(size):
        return grid
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(grid, size)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


# -- 1. feedback prompts ------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """Channel gating ``x * sigmoid(W2 relu(W1 mean_hw(x)))`` with a ``channels / ratio`` bottleneck."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // int(ratio))
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class PromptBlock(nn.Module):
    """The prompt in front of one teacher stage: ``x + beta * prompt(fuse(x, feedback))``.

    ``layout`` is that of the stage's input ``x`` in pand's layout and ``order`` the order the teacher actually
    passes it in (None, :data:`CHANNELS_LAST` or :data:`SEQUENCE_FIRST`); ``feedback_layout`` is that of the stage's
    output, where the student is compared with the teacher. The block keeps the latest feedback (the batch mean of
    the detached difference aligned student feature minus prompted teacher feature, ``[1, *output shape]``) as a
    persistent buffer: zero at the start, resumed from checkpoints, and independent of the batch size (a smaller
    last batch broadcasts it).

    - fuse: the feedback is resized to the input grid and projected to its channels (1 x 1 conv), concatenated with
      ``x`` and mixed back to ``C`` channels by a 1 x 1 conv. Concatenation, not addition, so the block can weigh the
      two separately (the feedback is a difference of features whose scale has nothing to do with ``x``'s).
    - prompt: grouped 1 x 1 conv, depthwise 5 x 5 conv, GELU, 1 x 1 conv, squeeze-excitation, grouped 1 x 1 conv.
    - tokens ``[B, N, C]`` get the same block on their patch grid after a LayerNorm over channels (a transformer's
      residual stream is not normalised, a CNN stage input comes after batch norm). The depthwise conv over the grid
      is the token-wise counterpart of the map block's spatial mixing; prefix tokens (class token) are left as they
      are, since they have no place on the grid.
    - ``beta`` is a learnable scalar starting at 0: the prompted teacher is exactly the plain one until training
      moves it, and the output keeps ``x``'s dtype.
    """

    def __init__(self, layout: Layout, feedback_layout: Layout, se_ratio: int = 16, order: str | None = None) -> None:
        super().__init__()
        self.layout, self.feedback_layout, self.order = layout, feedback_layout, order
        c = layout.channels
        groups = math.gcd(c, 4)
        self.norm = nn.LayerNorm(c) if layout.kind == TOKENS else nn.Identity()
        self.feedback_proj = nn.Conv2d(feedback_layout.channels, c, 1)
        self.fuse = nn.Conv2d(2 * c, c, 1)
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 1, groups=groups),
            nn.Conv2d(c, c, 5, padding=2, groups=c),
            nn.GELU(),
            nn.Conv2d(c, c, 1),
            SqueezeExcite(c, se_ratio),
            nn.Conv2d(c, c, 1, groups=groups),
        )
        self.beta = nn.Parameter(torch.zeros(()))
        self.register_buffer("feedback", torch.zeros(1, *feedback_layout.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.layout.to_grid(self.norm(to_pand_layout(x, self.order)))
        # A copy: the buffer is overwritten in place by remember() before this graph's backward pass runs.
        fb = self.feedback_layout.to_grid(self.feedback.clone())
        fb = resize_grid(fb, (self.layout.height, self.layout.width))
        fb = self.feedback_proj(fb.to(grid.dtype)).expand(grid.shape[0], -1, -1, -1)
        delta = self.layout.from_grid(self.body(self.fuse(torch.cat([grid, fb], dim=1))))
        return x + from_pand_order(self.beta * delta, self.order).to(x.dtype)

    @torch.no_grad()
    def remember(self, difference: torch.Tensor) -> None:
        """Keep the batch mean of ``difference`` ``[B, *output shape]`` as the next step's feedback."""
        self.feedback.copy_(difference.detach().float().mean(0, keepdim=True))


class PromptHooks:
    """Forward pre-hooks that pass the inputs of ``names`` (submodules of ``root``) through ``prompts``.

    The hooks change nothing unless :attr:`active` is set, so the teacher's ordinary passes stay plain. They hold
    the prompts weakly: a distiller that is dropped takes its prompts along and the hooks are removed with it.
    """

    def __init__(self, root: nn.Module, names: Sequence[str], prompts: nn.ModuleList) -> None:
        modules = dict(root.named_modules())
        self.active = False
        self._prompts = weakref.ref(prompts)
        self._handles = [modules[n].register_forward_pre_hook(self._hook(k, n), with_kwargs=True)
                         for k, n in enumerate(names)]
        weakref.finalize(prompts, PromptHooks._remove, list(self._handles))

    def _hook(self, index: int, name: str):
        def hook(module, args, kwargs):
            prompts = self._prompts()
            if not self.active or prompts is None:
                return None
            if not args or not torch.is_tensor(args[0]):
                raise RuntimeError(f"teacher stage {name!r} takes no positional tensor input for PAT's prompt")
            return (prompts[index](args[0]), *args[1:]), kwargs

        return hook

    @staticmethod
    def _remove(handles) -> None:
        for handle in handles:
            handle.remove()

    def close(self) -> None:
        PromptHooks._remove(self._handles)
        self._handles = []


# -- 2. region-aware attention ------------------------------------------------------------------------------------
class RegionEmbed(nn.Module):
    """A stage feature as ``grid x grid`` region tokens of width ``dim``: a patch embedding of its grid view.

    The grid is resized to ``grid * p`` per side (``p = ceil(side / grid)``, so a map smaller than the grid is
    upsampled) and embedded by a ``p x p`` stride-``p`` convolution; each token then summarises one region.
    """

    def __init__(self, layout: Layout, grid: int, dim: int) -> None:
        super().__init__()
        self.layout, self.grid = layout, int(grid)
        self.patch = (math.ceil(layout.height / self.grid), math.ceil(layout.width / self.grid))
        self.proj = nn.Conv2d(layout.channels, dim, self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = resize_grid(self.layout.to_grid(x), (self.grid * self.patch[0], self.grid * self.patch[1]))
        return self.proj(grid).flatten(2).transpose(1, 2)  # [B, grid^2, dim]


class RegionAttention(nn.Module):
    """Region tokens of every chosen student stage, mixed across stages by multi-head self-attention.

    Each stage gives ``grid^2`` tokens (:class:`RegionEmbed`) plus a learned stage embedding (which stage a token
    comes from) and a learned region embedding shared by the stages (where on the grid it sits); the tokens of all
    stages are concatenated and mixed: ``LayerNorm(t + MHA(t, t, t))``. The output is split back per stage.
    """

    def __init__(self, layouts: Sequence[Layout], grid: int = 4, dim: int = 512, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"PAT's embed_dim={dim} must be a multiple of num_heads={heads}")
        self.embeds = nn.ModuleList(RegionEmbed(layout, grid, dim) for layout in layouts)
        self.tokens_per_stage = int(grid) ** 2
        self.stage_embed = nn.Parameter(torch.zeros(len(self.embeds), 1, dim))
        self.region_embed = nn.Parameter(torch.zeros(1, self.tokens_per_stage, dim))
        nn.init.trunc_normal_(self.stage_embed, std=0.02)
        nn.init.trunc_normal_(self.region_embed, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tokens = torch.cat([embed(f) + self.stage_embed[i] + self.region_embed
                            for i, (embed, f) in enumerate(zip(self.embeds, feats))], dim=1)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return list(self.norm(tokens + mixed).split(self.tokens_per_stage, dim=1))


# -- 3. aligners --------------------------------------------------------------------------------------------------
class Aligner(nn.Module):
    """Maps one stage's ``grid^2`` attention tokens ``[B, grid^2, dim]`` to a teacher stage's shape.

    Maps: the tokens as a ``dim x grid x grid`` map, a 1 x 1 conv to the teacher's channels, resized to its
    ``H x W``. Tokens: a linear layer to the teacher's width on each
    token, the grid resized to the teacher's patch grid; prefix tokens (a class token) come from a linear layer on
    the mean token, as a class token summarises the whole image.
    """

    def __init__(self, dim: int, grid: int, target: Layout) -> None:
        super().__init__()
        self.grid, self.target = int(grid), target
        c = target.channels
        if target.kind == TOKENS:
            self.proj = nn.Linear(dim, c)
            self.prefix = nn.Linear(dim, target.prefix * c) if target.prefix else None
        else:
            self.proj = nn.Conv2d(dim, c, 1)
            self.prefix = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, size = tokens.shape[0], (self.target.height, self.target.width)
        if self.target.kind == TOKENS:
            grid = self.proj(tokens).transpose(1, 2).reshape(b, -1, self.grid, self.grid)
            prefix = None
            if self.prefix is not None:
                prefix = self.prefix(tokens.mean(dim=1)).reshape(b, self.target.prefix, self.target.channels)
            return self.target.from_grid(resize_grid(grid, size), prefix)
        grid = tokens.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        return self.target.from_grid(resize_grid(self.proj(grid), size))
