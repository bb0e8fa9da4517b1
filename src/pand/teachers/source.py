"""Where a batch's teacher outputs come from.

Teacher outputs are data: a distiller names the per-sample outputs it reads (``Distiller.requires``) and receives
them as a dict of tensors keyed by name, without knowing whether a live frozen teacher computed them for this exact
augmented batch or a cache stored them for the same replayed view. Every source implements ``__call__(batch, keys)``.

Per-sample keys:
    ``image_embeds``  B x D, L2-normalised teacher image embeddings (float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from pand.errors import ConfigError
from pand.teachers.clip import ClipTeacher

IMAGE_EMBEDS = "image_embeds"


class LiveTeacherSource(nn.Module):
    """Runs the frozen teacher on the batch's images (the same augmented view the student sees).

    ``mean``/``std`` are the normalisation of the batch images, so the teacher can convert them to its own.
    """

    provides = frozenset({IMAGE_EMBEDS})

    def __init__(self, teacher: ClipTeacher, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.teacher = teacher
        self.mean = tuple(mean)
        self.std = tuple(std)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        unknown = keys - self.provides
        if unknown:
            raise ConfigError(f"the live CLIP teacher cannot provide {sorted(unknown)}; it provides {sorted(self.provides)}")
        out: dict[str, torch.Tensor] = {}
        if IMAGE_EMBEDS in keys:
            images = self.teacher.prepare_images(batch["image"], self.mean, self.std)
            out[IMAGE_EMBEDS] = self.teacher.encode_images(images)
        return out
