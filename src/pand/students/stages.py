"""Intermediate (stage) features of any model, captured by forward hooks during its ordinary forward pass.

Methods such as OFA, NRKD and PAT read the feature maps (or token sequences) of named stages. pand never rewrites a
model's ``forward`` to get them: :class:`StageTap` registers forward hooks on the named submodules, so one normal
forward pass yields the logits and the stage features together, for any timm, torchvision or pand model.

Stage names are submodule paths (``layer3``, ``stages.2``, ``blocks.5``). :func:`default_stages` finds them without
per-architecture tables: timm models list theirs in ``feature_info``; torchvision ResNets have ``layer1..4``; pand's
CIFAR networks ``stage1..3``. Shapes are discovered by :func:`stage_shapes` with a dry run at the real input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pand.errors import ConfigError

_CONVENTIONS = (("layer1", "layer2", "layer3", "layer4"), ("stage1", "stage2", "stage3", "stage4"))


def _unwrap(model: nn.Module) -> nn.Module:
    # pand's Student keeps the network under .backbone
    return getattr(model, "backbone", model)


def default_stages(model: nn.Module) -> list[str]:
    """Submodule paths of ``model``'s stages, shallow to deep (relative to ``model`` itself)."""
    inner = _unwrap(model)
    prefix = "backbone." if inner is not model else ""
    names = dict(inner.named_modules())
    info = getattr(inner, "feature_info", None)
    if info is not None:
        found = [entry["module"] for entry in (info.info if hasattr(info, "info") else info) if entry.get("module")]
        found = [n for n in found if n in names]
        if found:
            return [prefix + n for n in found]
    for convention in _CONVENTIONS:
        found = [n for n in convention if n in names]
        if len(found) >= 2:
            return [prefix + n for n in found]
    raise ConfigError(
        f"cannot tell the stages of {type(inner).__name__}: name them, e.g. method.stages=[layer2,layer3] "
        "(submodule paths as in model.named_modules())"
    )


class StageTap:
    """Forward hooks that keep the outputs of ``names`` from the latest forward pass of ``model``.

    Use as ``with StageTap(model, names) as tap: logits = model(x); feats = tap.features``; or keep one open for a
    module's lifetime and call :meth:`close` when done.
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
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        def keep(module: nn.Module, args, output) -> None:
            if self.enabled:
                # Some blocks return (features, extras); the features come first.
                self.features[name] = output[0] if isinstance(output, (tuple, list)) else output

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


def stage_shapes(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample shapes of the stage features at ``input_size`` (C, H, W), found with one dry run in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with StageTap(model, names) as tap, torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_size, device=device))
            return [tuple(f.shape[1:]) for f in tap.take()]
    finally:
        model.train(was_training)
