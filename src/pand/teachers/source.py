"""Where a batch's teacher outputs come from.

Teacher outputs are data: a distiller names the per-sample outputs it reads (``Distiller.requires``) and receives
them as a dict of tensors keyed by name (see :mod:`pand.teachers.frozen`), without knowing whether a live frozen
teacher computed them for this exact augmented batch or a cache stored them for the same replayed view. Every source
is called as ``source(batch, keys)`` and says what it can deliver in ``provides``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from pand.errors import ConfigError
from pand.teachers.frozen import FrozenTeacher
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS

__all__ = ["IMAGE_EMBEDS", "LOGITS", "LiveTeacherSource", "ZeroShotLogits"]


def _check_keys(keys: set[str], provides: frozenset[str], what: str) -> None:
    unknown = keys - provides
    if unknown:
        raise ConfigError(f"{what} cannot provide {sorted(unknown)}; it provides {sorted(provides)}")


class LiveTeacherSource(nn.Module):
    """Runs the frozen teacher on the batch's images (the same augmented view the student sees).

    ``mean``/``std`` are the normalisation of the batch images, so the teacher can convert them to its own.
    """

    def __init__(self, teacher: FrozenTeacher, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.teacher = teacher
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def provides(self) -> frozenset[str]:
        return self.teacher.provides

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        _check_keys(keys, self.provides, f"the live {type(self.teacher).__name__}")
        if not keys:
            return {}
        return self.teacher.outputs(self.teacher.prepare_images(batch["image"], self.mean, self.std), keys)


class ZeroShotLogits(nn.Module):
    """Adds a CLIP teacher's class logits ``s * e @ T^T`` to a source of its image embeddings ``e``.

    ``T`` is the class text matrix: the template embeddings (zero-shot classifier) or learned CoOp features. Because
    the logits are computed from the embeddings, a teacher cache of embeddings serves logit-based methods too.
    """

    def __init__(self, inner: nn.Module, text_embeds: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.logit_scale = float(logit_scale)
        # Derived from the frozen teacher: moves with the module, never saved in a checkpoint.
        self.register_buffer("text_embeds", text_embeds.detach().float().clone(), persistent=False)

    @property
    def provides(self) -> frozenset[str]:
        return frozenset(self.inner.provides) | {LOGITS}

    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        _check_keys(keys, self.provides, "this CLIP teacher source")
        wanted = (keys - {LOGITS}) | ({IMAGE_EMBEDS} if LOGITS in keys else set())
        out = self.inner(batch, wanted)
        if LOGITS in keys:
            out[LOGITS] = self.logit_scale * out[IMAGE_EMBEDS].float() @ self.text_embeds.t()
        return {k: out[k] for k in keys}
