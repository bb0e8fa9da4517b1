"""What every pand teacher is: frozen weights, always in eval mode, named per-sample outputs.

Teacher outputs are data. A teacher declares the outputs it can compute (``provides``) and ``outputs(images, keys)``
returns them as a dict of tensors keyed by name; sources (:mod:`pand.teachers.source`) deliver them to distillers,
live or from a cache, under the same names.

Per-sample output names:
    ``image_embeds``  B x D, L2-normalised image embeddings of a CLIP-like teacher (float32).
    ``logits``        B x C class logits: a classifier's own, or a CLIP teacher's zero-shot / CoOp ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_EMBEDS = "image_embeds"
LOGITS = "logits"


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
