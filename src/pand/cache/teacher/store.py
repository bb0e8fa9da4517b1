"""An opened teacher cache, as the data loader and :class:`~pand.cache.teacher.CachedTeacherSource` read it: each
view's augmentation parameters and the teacher's outputs, memory-mapped lazily, shard by shard, in each process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pand.cache.codecs import decode_int8_rows
from pand.cache.teacher.build import build_cache
from pand.cache.teacher.layout import open_shard, stored_array
from pand.cache.teacher.record import CAPTIONS_FILE, checked_meta, decode_topk
from pand.data import ClassificationDataset
from pand.data.transforms import ReplayableAugment
from pand.errors import PandError
from pand.provenance import load_tensors
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, MEMBER_LOGITS
from pand.teachers.precision import DEFAULT_TOLERANCE


class TeacherCache:
    """A (possibly partial) teacher cache folder; arrays are memory-mapped lazily in each process."""

    def __init__(self, folder: str | os.PathLike, meta: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = dict(meta)
        self._shards: dict[int, dict[str, np.ndarray]] = {}
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes re-open the memory maps instead of receiving copies of them.
        return {"folder": self.folder, "meta": self.meta, "_shards": {}, "_pid": None}

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        """Shard ``s``'s arrays, mapped the first time this process reads one of its rows: a process opens only the
        shards its rows fall into."""
        if self._pid != os.getpid():
            self._shards, self._pid = {}, os.getpid()
        if s not in self._shards:
            self._shards[s] = open_shard(self.folder, self.meta, self.meta["arrays"], s)
        return self._shards[s]

    def array(self, name: str) -> np.ndarray:
        """Every row of array ``name`` (params, embeds, logits, ...), read into memory."""
        return stored_array(self.folder, name, self.meta)

    @property
    def opened_shards(self) -> list[int]:
        """The shards this process has mapped so far."""
        return sorted(self._shards) if self._pid == os.getpid() else []

    @property
    def views(self) -> int:
        return int(self.meta["views"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    def params(self, index: int, view: int) -> torch.Tensor:
        s, row = divmod(int(index), int(self.meta["shard_size"]))
        return torch.from_numpy(np.array(self._shard(s)["params"][row, view]))

    @property
    def outputs(self) -> frozenset[str]:
        """The per-sample teacher outputs the cache holds."""
        return frozenset(self.meta.get("outputs") or [IMAGE_EMBEDS])

    def describe_outputs(self) -> str:
        int8 = ", int8 rows" if self.meta.get("storage") == "int8" else ""
        if MEMBER_LOGITS in self.outputs:
            return f"member logits, {self.meta['num_members']} members, C={len(self.meta['classes'])}{int8}"
        if LOGITS not in self.outputs:
            return f"image embeddings, D={self.meta['embed_dim']}{int8}"
        c, k = len(self.meta["classes"]), self.meta.get("logits_topk")
        return f"logits, C={c}" + ("" if k is None else f", top-{k} kept") + int8

    def _rows(self, name: str, indices: torch.Tensor, views: torch.Tensor) -> np.ndarray:
        index, view = indices.cpu().numpy().astype(np.int64), views.cpu().numpy().astype(np.int64)
        spec = self.meta["arrays"][name]
        out = np.empty((len(index), spec["row"][1]), np.dtype(spec["dtype"]))
        shard, row = np.divmod(index, int(self.meta["shard_size"]))
        for s in np.unique(shard):
            here = shard == s
            out[here] = self._shard(int(s))[name][row[here], view[here]]
        return out

    def _values(self, name: str, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """float32 rows of output array ``name``, decoded when the cache stores int8 rows and their scales."""
        rows = self._rows(name, indices, views)
        if self.meta.get("storage") == "int8":
            return torch.from_numpy(decode_int8_rows(rows, self._rows(f"{name}_scale", indices, views)))
        return torch.from_numpy(rows.astype(np.float32))

    def embeds(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self._values("embeds", indices, views)

    def logits(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, C]`` class logits of those views (top-k storage: rebuilt by :func:`decode_topk`)."""
        if self.meta.get("logits_topk") is None:
            return self._values("logits", indices, views)
        values = torch.from_numpy(self._rows("logits_topk", indices, views))
        index = torch.from_numpy(self._rows("logits_index", indices, views))
        return decode_topk(values, index, len(self.meta["classes"]))

    def member_logits(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, M, C]``: each member's class logits of those views (a teacher ensemble's cache)."""
        rows = self._values("member_logits", indices, views)
        return rows.view(len(rows), int(self.meta["num_members"]), -1)

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
        caption_embeds: torch.Tensor | None = None, shard_size: int | None = None, num_members: int | None = None,
    ) -> TeacherCache | None:
        """Build (or resume) this process's share of the cache: shards ``rank, rank + world_size, ...`` of
        ``shard_size`` rows (None: :func:`~pand.cache.teacher.layout.default_shard_size`; a resumed cache keeps its
        own).

        ``teacher_source`` maps a batch ``{"image": ...}`` to the record's output (a live teacher): ``image_embeds``
        (a CLIP teacher; then ``text_embeds``, ``embed_dim`` and ``learned_logit_scale`` are stored too) or
        ``logits`` (a classifier teacher: none of those; the class count is the record's). The cache is marked
        complete once every row is verified; returns the opened cache when complete, else None. An existing cache that is damaged (:class:`CacheDamagedError`) or made for something else
        (:class:`~pand.errors.MismatchError`) is refused, or with ``rebuild=True`` deleted and built again; an
        interrupted one is resumed. With several processes, ``barrier(ok) -> bool`` waits for all of them and says
        whether all are ok, so that an error in one makes every process stop instead of waiting forever; process 0
        then completes the cache and every process gets it opened. Without a barrier, the process that finds every
        shard finished completes it, and the others get None.

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
            augment_on=augment_on, num_workers=num_workers, caption_embeds=caption_embeds, shard_size=shard_size,
            num_members=num_members)
        return None if meta is None else cls(folder, meta)
