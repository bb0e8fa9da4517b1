"""The teacher a distiller sees when a cache stands in for it: the stored outputs of the batch's cached views."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pand.cache.teacher.store import TeacherCache
from pand.errors import PandError
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, MEMBER_LOGITS


class CachedTeacherSource(nn.Module):
    """Teacher outputs read from a :class:`TeacherCache` by the batch's ``index`` and ``view``: a CLIP teacher's
    ``image_embeds``, a classifier teacher's ``logits`` (float32 ``[B, C]``) or a teacher ensemble's
    ``member_logits`` (``[B, M, C]``), whichever the cache holds."""

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__()
        self.cache = cache
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def provides(self) -> frozenset[str]:
        return self.cache.outputs

    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        if keys - self.provides:
            raise PandError(f"the teacher cache holds {sorted(self.provides)}, not {sorted(keys - self.provides)}")
        if "view" not in batch:
            raise PandError("batches lack the 'view' key: the data module was not built for this teacher cache")
        device = self._device_probe.device
        out = {}
        if IMAGE_EMBEDS in keys:
            emb = self.cache.embeds(batch["index"], batch["view"]).to(device, non_blocking=True)
            # Re-normalise: float16 storage moves the norm by ~1e-3.
            out[IMAGE_EMBEDS] = F.normalize(emb, dim=-1)
        if LOGITS in keys:
            out[LOGITS] = self.cache.logits(batch["index"], batch["view"]).to(device, non_blocking=True)
        if MEMBER_LOGITS in keys:
            out[MEMBER_LOGITS] = self.cache.member_logits(batch["index"], batch["view"]).to(device, non_blocking=True)
        return out
