"""Intermediate (stage) features of any model, captured by forward hooks during its ordinary forward pass.

Methods such as OFA, NRKD and PAT read the feature maps (or token sequences) of named stages. pand never rewrites a
model's ``forward`` to get them: :class:`StageTap` registers forward hooks on the named submodules, so one normal
forward pass yields the logits and the stage features together, for any timm, torchvision or pand model.

Stage names are submodule paths (``layer3``, ``stages.2``, ``blocks.5``). :func:`default_stages` finds them without
per-architecture tables: timm models list theirs in ``feature_info``; torchvision ResNets have ``layer1..4``; pand's
CIFAR networks ``stage1..3``; torchvision's block sequences ``features`` (MobileNets, EfficientNets, ConvNeXt, VGG,
DenseNet) and ``layers`` (MNASNet) give the last block of each resolution, read from the strides of their
convolutions and poolings; transformers without any of these (open_clip's visual tower) a block list ``blocks``,
``transformer.resblocks`` or ``resblocks``. Shapes are discovered by :func:`stage_shapes` with a dry run at the real
input size.

Every stage feature comes out as a CNN map ``[B, C, H, W]`` or tokens ``[B, N, C]``, whatever the model's own layout.
One rule per stage, read from the nearest enclosing module that declares a layout: timm's ``output_fmt == "NHWC"``
(Swin, MambaOut, Sequencer keep maps channels-last) permutes 4-D outputs to ``[B, C, H, W]``; ``batch_first is False``
(a sequence-first open_clip ``Transformer``) transposes 3-D outputs ``[N, B, C]`` to ``[B, N, C]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pand.errors import ConfigError

_CONVENTIONS = (("layer1", "layer2", "layer3", "layer4"), ("stage1", "stage2", "stage3", "stage4"))
# Block lists of transformers that have neither feature_info nor numbered stages (open_clip's ViT, plain ViTs).
_BLOCK_LISTS = ("blocks", "transformer.resblocks", "resblocks")
_NUM_BLOCK_STAGES = 4
# Block sequences whose stages are told apart by resolution. A Sequential's last block is what its model pools.
_SEQUENCES = ("features", "layers")
_DOWNSAMPLERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)

# Stage layouts that need rearranging (see the module docstring).
CHANNELS_LAST = "NHWC"
SEQUENCE_FIRST = "NBC"


def _unwrap(model: nn.Module) -> nn.Module:
    # pand's Student keeps the network under .backbone
    return getattr(model, "backbone", model)


def _spread(items: list) -> list:
    """Four (or all, if fewer) evenly spaced items, the last always included: its output is what the head reads."""
    n, k = len(items), min(_NUM_BLOCK_STAGES, len(items))
    return [items[(i + 1) * n // k - 1] for i in range(k)]


def _downsamples(block: nn.Module) -> bool:
    # Strides, not a dry run: no input size, device or dtype is needed. A Swin's PatchMerging (a reshape, no stride)
    # leaves it with one resolution, so it is refused rather than tapped in its channels-last layout.
    for m in block.modules():
        if isinstance(m, _DOWNSAMPLERS):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if max(stride) > 1:
                return True
    return False


def _resolution_stages(sequence: nn.Sequential) -> list[str]:
    """The last block of each resolution: every block followed by one that downsamples, and the last block."""
    keys = list(sequence._modules)
    blocks = list(sequence)
    return [keys[i - 1] for i in range(1, len(blocks)) if _downsamples(blocks[i])] + keys[-1:]


def default_stages(model: nn.Module) -> list[str]:
    """Submodule paths of ``model``'s stages, shallow to deep (relative to ``model`` itself)."""
    inner = _unwrap(model)
    prefix = "backbone." if inner is not model else ""
    names = dict(inner.named_modules())
    info = getattr(inner, "feature_info", None)
    if info is not None:
        entries = [e for e in (info.info if hasattr(info, "info") else info) if e.get("module") in names]
        if len({e.get("reduction") for e in entries}) == 1 and len(entries) > _NUM_BLOCK_STAGES:
            # A flat ViT / Mixer lists every block at one resolution: four spread over the depth, as for block lists.
            entries = _spread(entries)
        if entries:
            return [prefix + e["module"] for e in entries]
    for convention in _CONVENTIONS:
        found = [n for n in convention if n in names]
        if len(found) >= 2:
            return [prefix + n for n in found]
    for path in _SEQUENCES:
        sequence = names.get(path)
        if isinstance(sequence, nn.Sequential) and len(sequence):
            found = _resolution_stages(sequence)
            if len(found) >= 2:  # one resolution after the stem (a Swin): refused rather than guessed
                return [f"{prefix}{path}.{k}" for k in found]
    for path in _BLOCK_LISTS:
        blocks = names.get(path)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return [f"{prefix}{path}.{i}" for i in _spread(list(range(len(blocks))))]
    raise ConfigError(
        f"cannot tell the stages of {type(inner).__name__}: name them, e.g. method.stages=[layer2,layer3] "
        "(submodule paths as in model.named_modules())"
    )


def _stage_layout(modules: dict[str, nn.Module], name: str) -> str | None:
    """The layout flag of the nearest module enclosing stage ``name``, or None for pand's own layout."""
    parts = name.split(".")
    # Enclosing modules only: open_clip's Transformer is sequence-first inside, yet returns batch-first tokens itself.
    for depth in range(len(parts) - 1, -1, -1):
        parent = modules.get(".".join(parts[:depth]))
        fmt, batch_first = getattr(parent, "output_fmt", None), getattr(parent, "batch_first", None)
        if isinstance(fmt, str):
            return CHANNELS_LAST if fmt == CHANNELS_LAST else None
        if isinstance(batch_first, bool):
            return None if batch_first else SEQUENCE_FIRST
    return None


def to_pand_layout(feature: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A stage tensor in ``layout`` (None, :data:`CHANNELS_LAST` or :data:`SEQUENCE_FIRST`) as ``[B, C, H, W]`` /
    ``[B, N, C]`` (a view)."""
    if layout == CHANNELS_LAST and feature.dim() == 4:
        return feature.permute(0, 3, 1, 2)
    if layout == SEQUENCE_FIRST and feature.dim() == 3:
        return feature.transpose(0, 1)
    return feature


class StageTap:
    """Forward hooks that keep the outputs of ``names`` from the latest forward pass of ``model``.

    Use as ``with StageTap(model, names) as tap: logits = model(x); feats = tap.features``; or keep one open for a
    module's lifetime and call :meth:`close` when done. Features are kept as ``[B, C, H, W]`` maps or ``[B, N, C]``
    tokens (channels-last maps are permuted, sequence-first tokens transposed: views, no copies).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"{type(model).__name__} has no submodule {unknown[0]!r}; stage names are paths from "
                              "model.named_modules()")
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self.enabled = True  # a module that reads stages only in training steps turns this off in between
        self.layouts = {n: _stage_layout(modules, n) for n in self.names}
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        layout = self.layouts[name]

        def keep(module: nn.Module, args, output) -> None:
            if self.enabled:
                # Some blocks return (features, extras); the features come first.
                feature = output[0] if isinstance(output, (tuple, list)) else output
                self.features[name] = to_pand_layout(feature, layout)

        return keep

    def take(self) -> list[torch.Tensor]:
        """The stage features of the latest forward pass, in stage order, and forget them."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"stage {missing[0]!r} did not run in the last forward pass")
        out = [self.features.pop(n) for n in self.names]
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StageTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pair_deepest(student: Sequence, teacher: Sequence) -> tuple[list, list]:
    """Student and teacher stages paired deepest first: the last ``n`` of each, ``n`` the smaller count."""
    n = min(len(student), len(teacher))
    return list(student[len(student) - n:]), list(teacher[len(teacher) - n:])


def require_input_size(student: nn.Module, method: str) -> tuple[int, ...]:
    """The student's ``input_size`` (3, H, W), which methods with stage heads need for their dry run."""
    size = getattr(student, "input_size", None)
    if size is None:
        raise ConfigError(f"{method} sizes its modules with a dry run at the input size: build the student with "
                          "image_size=... (or set student.input_size = (3, H, W))")
    return tuple(size)


def stage_shapes(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample shapes of the stage features at ``input_size`` (C, H, W), found with one dry run in eval mode.

    Maps come as ``(C, H, W)``, tokens as ``(N, C)``, in :class:`StageTap`'s layout.
    """
    was_training = model.training
    model.eval()
    try:
        with StageTap(model, names) as tap, torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_size, device=device))
            return [tuple(f.shape[1:]) for f in tap.take()]
    finally:
        model.train(was_training)
