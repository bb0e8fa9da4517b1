"""What every pand teacher is: frozen weights, always in eval mode, named per-sample outputs.

Teacher outputs are data. A teacher declares the outputs it can compute (``provides``) and ``outputs(images, keys)``
returns them as a dict of tensors keyed by name; sources (:mod:`pand.teachers.source`) deliver them to distillers,
live or from a cache, under the same names.

The output names and what each holds are in :mod:`pand.teachers.outputs`.

``outputs`` runs with gradients enabled if the caller allows them: a source wraps it in ``torch.no_grad``; a method
that trains modules inside the teacher (PAT's prompts) calls it with gradients flowing to those modules, while the
teacher's own weights stay frozen (``requires_grad=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pand.networks.stages import StageTap, default_stages
from pand.teachers.outputs import STAGE_FEATURES


def convert_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], to_mean: Sequence[float],
                   to_std: Sequence[float], size: int | None) -> torch.Tensor:
    """A batch normalised with ``mean``/``std`` re-normalised with ``to_mean``/``to_std`` and resized to ``size``.

    A no-op when the student's pipeline already matches the teacher's (the usual case).
    """
    src = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
    dst = (tuple(float(m) for m in to_mean), tuple(float(s) for s in to_std))
    if src != dst:
        src_m, src_s = (images.new_tensor(v).view(1, -1, 1, 1) for v in src)
        dst_m, dst_s = (images.new_tensor(v).view(1, -1, 1, 1) for v in dst)
        images = ((images * src_s + src_m) - dst_m) / dst_s
    if size is not None and (images.shape[-1] != size or images.shape[-2] != size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return images


class TeacherRef:
    """Holds a frozen teacher (or its source) outside the module tree: a module keeping one is saved, wrapped by DDP
    and copied without it. Copies share the teacher (an EMA of the student's weights deep-copies the training module;
    the frozen teacher, possibly billions of parameters, must not be copied with it)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __deepcopy__(self, memo) -> TeacherRef:
        return self


class FrozenTeacher(nn.Module):
    """Base class of pand's teachers.

    Subclasses set ``provides``, ``image_size`` (None: any), ``mean``/``std`` (the normalisation their weights expect)
    and ``identity`` (what made the weights, stored beside every artefact derived from them), and implement
    :meth:`outputs`.
    """

    provides: ClassVar[frozenset[str]] = frozenset()
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: dict[str, str]

    _stage_names: list[str] | None = None
    _tap = None

    @property
    def stage_root(self) -> nn.Module:
        """The module whose submodule paths name the stages (a classifier itself, a CLIP model's image tower)."""
        raise NotImplementedError

    @property
    def stage_names(self) -> list[str]:
        if self._stage_names is None:
            self._stage_names = default_stages(self.stage_root)
        return list(self._stage_names)

    def use_stages(self, names: Sequence[str] | None) -> None:
        """Read ``names`` (submodule paths of :attr:`stage_root`) as the stages; None: the default ones."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        self._stage_names = list(names) if names else None

    @contextmanager
    def capturing_stages(self, wanted: bool) -> Iterator[Callable[[], list[torch.Tensor]]]:
        """Within the block, forward passes of :attr:`stage_root` keep the stage features; the yielded function
        returns those of the latest pass. Hooks stay registered between calls but keep nothing while disabled."""
        if not wanted:
            yield list
            return
        if self._tap is None:
            self._tap = StageTap(self.stage_root, self.stage_names)
        self._tap.enabled = True
        try:
            yield self._tap.take
        finally:
            self._tap.enabled = False
            self._tap.features.clear()

    def stage_shapes(self, image_size: int) -> list[tuple[int, ...]]:
        """Per-sample shapes of the stage features at ``image_size`` px (the teacher's own size when it has one)."""
        size = self.image_size or int(image_size)
        with torch.no_grad():
            out = self.outputs(torch.zeros(1, 3, size, size, device=self.device), {STAGE_FEATURES})
        return [tuple(f.shape[1:]) for f in out[STAGE_FEATURES]]

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        # A parent module's .train() must not switch the teacher's dropout, drop-path or batch-norm updates on.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare_images(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Convert a batch normalised with ``mean``/``std`` into the teacher's size and normalisation."""
        return convert_images(images, mean, std, self.mean, self.std, self.image_size)

    def outputs(self, images: torch.Tensor, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The outputs ``keys`` for images already in the teacher's size and normalisation."""
        raise NotImplementedError
