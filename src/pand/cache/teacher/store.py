"""An opened teacher cache, as the data loader and :class:`~pand.cache.teacher.CachedTeacherSource` read it: each
view's augmentation parameters and the teacher's outputs, memory-mapped lazily in each process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pand.cache.integrity import CacheDamagedError, check_array, output_names
from pand.cache.teacher.build import build_cache
from pand.cache.teacher.record import CAPTIONS_FILE, checked_meta, decode_topk
from pand.data import ClassificationDataset
from pand.data.transforms import ReplayableAugment
from pand.errors import PandError
from pand.provenance import load_tensors
from pand.teachers.precision import DEFAULT_TOLERANCE
from pand.teachers.source import IMAGE_EMBEDS, LOGITS


class TeacherCache:
    """A (possibly partial) teacher cache folder; arrays are memory-mapped lazily in each process."""

    def __init__(self, folder: str | os.PathLike, meta: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = dict(meta)
        self._arrays: dict[str, np.ndarray] | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes re-open the memory maps instead of receiving copies of them.
        return {"folder": self.folder, "meta": self.meta, "_arrays": None, "_pid": None}

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            arrays = {}
            for name in ("params", *output_names(self.meta)):
                # Each process checks header and size before mapping: a file cut short since open() is named here
                # instead of failing inside numpy's mmap.
                spec = (self.meta.get("arrays") or {}).get(name)
                if spec is not None:
                    check_array(self.folder, name, spec)
                try:
                    arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
                except (OSError, ValueError) as err:
                    raise CacheDamagedError(self.folder, f"{name}.npy cannot be memory-mapped ({err})") from None
            self._arrays = arrays
            self._pid = os.getpid()
        return self._arrays

    @property
    def views(self) -> int:
        return int(self.meta["views"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    def params(self, index: int, view: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays()["params"][index, view]))

    @property
    def outputs(self) -> frozenset[str]:
        """The per-sample teacher outputs the cache holds."""
        return frozenset(self.meta.get("outputs") or [IMAGE_EMBEDS])

    def describe_outputs(self) -> str:
        if LOGITS not in self.outputs:
            return f"image embeddings, D={self.meta['embed_dim']}"
        c, k = len(self.meta["classes"]), self.meta.get("logits_topk")
        return f"logits, C={c}" + ("" if k is None else f", top-{k} kept")

    def _rows(self, name: str, indices: torch.Tensor, views: torch.Tensor) -> np.ndarray:
        return np.asarray(self.arrays()[name][indices.cpu().numpy(), views.cpu().numpy()])

    def embeds(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._rows("embeds", indices, views).astype(np.float32))

    def logits(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, C]`` class logits of those views (top-k storage: rebuilt by :func:`decode_topk`)."""
        if self.meta.get("logits_topk") is None:
            return torch.from_numpy(self._rows("logits", indices, views).astype(np.float32))
        values = torch.from_numpy(self._rows("logits_topk", indices, views))
        index = torch.from_numpy(self._rows("logits_index", indices, views))
        return decode_topk(values, index, len(self.meta["classes"]))

    def text_embeds(self) -> torch.Tensor:
        return load_tensors(self.folder / "text.safetensors")[0]["text_embeds"].float()

    def caption_embeds(self) -> torch.Tensor:
        """float16 ``[M, D]``: the teacher's embeddings of the training images' captions (see ``cache_record``)."""
        if self.meta.get("captions") is None:
            raise PandError(f"the teacher cache at {self.folder} holds no caption embeddings: it was built for "
                            "training images without captions")
        return load_tensors(self.folder / CAPTIONS_FILE)[0]["caption_embeds"]

    @classmethod
    def open(cls, folder: str | os.PathLike, expected: Mapping[str, Any] | None = None,
             verify: str = "auto") -> TeacherCache:
        """A complete, undamaged cache whose record matches ``expected`` (when given); otherwise a clear refusal.

        Missing or incomplete: :class:`~pand.errors.PandError` (build / resume it). Made for something else, or by
        another cache format version: :class:`~pand.errors.MismatchError`. Damaged: :class:`CacheDamagedError`.
        ``verify`` picks how many rows are checked against their digests: "auto", "full" or "sample".
        """
        return cls(folder, checked_meta(Path(folder), expected, verify))

    @classmethod
    def build(
        cls, folder: str | os.PathLike, record: Mapping[str, Any], dataset: ClassificationDataset,
        augment: ReplayableAugment, teacher_source: nn.Module, text_embeds: torch.Tensor | None,
        teacher_identity: Mapping, *, embed_dim: int | None = None, learned_logit_scale: float | None = None,
        batch_size: int = 64, rank: int = 0, world_size: int = 1, rebuild: bool = False, progress: bool = True,
        barrier=None, precision_tolerance: float = DEFAULT_TOLERANCE, augment_on: str = "cpu", num_workers: int = 0,
        caption_embeds: torch.Tensor | None = None,
    ) -> TeacherCache | None:
        """Build (or resume) this process's share of the cache: rows ``rank, rank + world_size, ...``.

        ``teacher_source`` maps a batch ``{"image": ...}`` to the record's output (a live teacher): ``image_embeds``
        (a CLIP teacher; then ``text_embeds``, ``embed_dim`` and ``learned_logit_scale`` are stored too) or
        ``logits`` (a classifier teacher: none of those; the class count is the record's). The last
        process to finish verifies every row and marks the cache complete; returns the opened cache when complete,
        else None. An existing cache that is damaged (:class:`CacheDamagedError`) or made for something else
        (:class:`~pand.errors.MismatchError`) is refused, or with ``rebuild=True`` deleted and built again; an
        interrupted one is resumed. With several processes, ``barrier(ok) -> bool`` waits for all of them and says
        whether all are ok, so that an error in one makes every process stop instead of waiting forever.

        The teacher runs in the record's ``precision`` (fp32 unless recorded); a low precision whose first batch does
        not agree with fp32 within ``precision_tolerance`` raises :class:`~pand.errors.PrecisionError` before a row
        is written, and the files this call created are removed again (an interrupted cache being resumed is left as
        it was). The measured agreement of process 0 goes into meta.json (``agreement``).

        ``caption_embeds``: the teacher's ``[M, D]`` embeddings of the training images' captions, stored (float16) in
        ``captions.safetensors`` when the record has ``captions`` (and required then).
        """
        meta = build_cache(
            folder, record, dataset, augment, teacher_source, text_embeds, teacher_identity, embed_dim=embed_dim,
            learned_logit_scale=learned_logit_scale, batch_size=batch_size, rank=rank, world_size=world_size,
            rebuild=rebuild, progress=progress, barrier=barrier, precision_tolerance=precision_tolerance,
            augment_on=augment_on, num_workers=num_workers, caption_embeds=caption_embeds)
        return None if meta is None else cls(folder, meta)
