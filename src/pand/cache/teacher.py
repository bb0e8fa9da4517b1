"""The teacher cache: K augmented views per training image, their parameters and the teacher's embedding of each.

Layout of a cache folder:

    meta.json        provenance (teacher, dataset fingerprint, transform, K, seed, ...) and ``complete``
    params.npy       float32 [N, K, P]  augmentation parameters of every view (replayable with ReplayableAugment)
    embeds.npy       float16 [N, K, D]  L2-normalised teacher image embedding of exactly that view
    done.npy         bool    [N]        rows written so far (a killed build resumes from here)
    text.safetensors float32 [C, D]     the class text embeddings of the data config's templates

During training each epoch picks one cached view per image (seeded by seed, epoch and index), the data loader rebuilds
that view for the student from its parameters, and :class:`CachedTeacherSource` returns the stored embedding: the
teacher model is never loaded. A cache made with another teacher, data or transform is refused with the reason; an
unfinished one is never read as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pand.data import ClassificationDataset
from pand.data.transforms import ReplayableAugment, view_generator
from pand.errors import MismatchError, PandError
from pand.io import atomic_write_json
from pand.provenance import check_provenance, load_tensors, save_tensors
from pand.teachers.source import IMAGE_EMBEDS

log = logging.getLogger("pand")

FORMAT_VERSION = 1
# What must agree between a cache and a run for the run to use it.
_CHECKED = ("kind", "version", "teacher_spec", "dataset", "split", "fingerprint", "transform", "views", "seed",
            "classes", "templates")


def choose_view(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the K cached views of ``index`` an epoch uses: seeded, independent across epochs and images."""
    digest = hashlib.blake2b(f"view|{seed}|{epoch}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % views


def cache_record(
    *, teacher_spec: Mapping[str, Any], dataset: ClassificationDataset, augment: ReplayableAugment, views: int,
    seed: int, templates: Sequence[str],
) -> dict[str, Any]:
    return {
        "kind": "teacher_view_cache",
        "version": FORMAT_VERSION,
        "teacher_spec": dict(teacher_spec),
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_samples": len(dataset),
        "transform": augment.describe(),
        "views": int(views),
        "seed": int(seed),
        "classes": list(dataset.classes),
        "templates": list(templates),
    }


class TeacherCache:
    """A (possibly partial) teacher cache folder; arrays are memory-mapped lazily in each process."""

    def __init__(self, folder: str | os.PathLike, meta: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = dict(meta)
        self._arrays: dict[str, np.ndarray] | None = None
        self._pid: int | None = None

    # -- reading -------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Worker processes re-open the memory maps instead of receiving copies of them.
        return {"folder": self.folder, "meta": self.meta, "_arrays": None, "_pid": None}

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ("params", "embeds")
            }
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

    def embeds(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        rows = self.arrays()["embeds"][indices.cpu().numpy(), views.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def text_embeds(self) -> torch.Tensor:
        return load_tensors(self.folder / "text.safetensors")[0]["text_embeds"].float()

    @classmethod
    def open(cls, folder: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> TeacherCache:
        """A complete cache whose record matches ``expected`` (when given); otherwise a clear refusal."""
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise PandError(f"no teacher cache at {folder} (missing meta.json); build it with `pand cache build ...`")
        meta = json.loads(meta_path.read_text())
        if not meta.get("complete"):
            raise PandError(
                f"the teacher cache at {folder} is incomplete (a build was interrupted); run `pand cache build` "
                "with the same settings to resume it"
            )
        if expected is not None:
            check_provenance(folder, meta, expected, keys=[k for k in _CHECKED if k in expected],
                             hint="Build a cache for this run with `pand cache build ...` (or cache.rebuild=true).")
        return cls(folder, meta)

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, folder: str | os.PathLike, record: Mapping[str, Any], dataset: ClassificationDataset,
        augment: ReplayableAugment, teacher_source: nn.Module, text_embeds: torch.Tensor, teacher_identity: Mapping,
        *, embed_dim: int, learned_logit_scale: float, batch_size: int = 64, rank: int = 0, world_size: int = 1, rebuild: bool = False,
        progress: bool = True, barrier=None,
    ) -> TeacherCache | None:
        """Build (or resume) this process's share of the cache: rows ``rank, rank + world_size, ...``.

        ``teacher_source`` maps a batch ``{"image": ...}`` to ``{"image_embeds": ...}`` (a live teacher). The last
        process to finish marks the cache complete; returns the opened cache when complete, else None.
        """
        folder = Path(folder)
        n, k = len(dataset), int(record["views"])
        meta_path = folder / "meta.json"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            if meta_path.is_file():
                old = json.loads(meta_path.read_text())
                try:
                    check_provenance(folder, old, record, keys=list(_CHECKED))
                except MismatchError:
                    if not rebuild:
                        raise
                    log.warning("rebuilding the teacher cache at %s: it was made for something else", folder)
                    for name in ("params.npy", "embeds.npy", "done.npy", "meta.json"):
                        (folder / name).unlink(missing_ok=True)
            if not meta_path.is_file():
                d = int(embed_dim)
                np.lib.format.open_memmap(folder / "params.npy", "w+", np.float32, (n, k, augment.num_params)).flush()
                np.lib.format.open_memmap(folder / "embeds.npy", "w+", np.float16, (n, k, d)).flush()
                np.lib.format.open_memmap(folder / "done.npy", "w+", np.bool_, (n,)).flush()
                save_tensors(folder / "text.safetensors", {"text_embeds": text_embeds.float().cpu()},
                             {"teacher": dict(teacher_identity), "classes": record["classes"]})
                atomic_write_json(meta_path, {**record, "teacher": dict(teacher_identity), "embed_dim": d,
                                              "learned_logit_scale": float(learned_logit_scale), "complete": False})
        if barrier is not None:
            barrier()
        params = np.load(folder / "params.npy", mmap_mode="r+")
        embeds = np.load(folder / "embeds.npy", mmap_mode="r+")
        done = np.load(folder / "done.npy", mmap_mode="r+")
        seed = int(record["seed"])
        todo = [i for i in range(rank, n, world_size) if not done[i]]
        if todo and len(todo) < len(range(rank, n, world_size)):
            log.info("resuming the teacher cache at %s: %d of %d images left", folder, len(todo), n)
        device = next(iter(teacher_source.parameters()), torch.zeros(())).device
        chunks: Iterable = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
        if progress:
            from rich.progress import track

            chunks = track(list(chunks), description=f"teacher cache ({k} views, rank {rank})")
        for chunk in chunks:
            images = [dataset.load_image(i) for i in chunk]
            for v in range(k):
                views, ps = zip(*(augment(img, view_generator(seed, v, i)) for i, img in zip(chunk, images)))
                with torch.no_grad():
                    emb = teacher_source({"image": torch.stack(views).to(device)}, {IMAGE_EMBEDS})[IMAGE_EMBEDS]
                params[chunk, v] = torch.stack(ps).numpy()
                embeds[chunk, v] = emb.float().cpu().numpy().astype(np.float16)
            params.flush()
            embeds.flush()
            done[chunk] = True  # only after the rows themselves are on disk
            done.flush()
        if barrier is not None:
            barrier()
        if rank == 0 or barrier is None:
            if bool(np.all(np.load(folder / "done.npy", mmap_mode="r"))):
                meta = json.loads(meta_path.read_text())
                atomic_write_json(meta_path, {**meta, "complete": True})
                return cls.open(folder)
        return None


class CachedTeacherSource(nn.Module):
    """Teacher outputs read from a :class:`TeacherCache` by the batch's ``index`` and ``view``."""

    provides = frozenset({IMAGE_EMBEDS})

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__()
        self.cache = cache
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        if keys - self.provides:
            raise PandError(f"the teacher cache holds {sorted(self.provides)}, not {sorted(keys - self.provides)}")
        if "view" not in batch:
            raise PandError("batches lack the 'view' key: the data module was not built for this teacher cache")
        emb = self.cache.embeds(batch["index"], batch["view"]).to(self._device_probe.device, non_blocking=True)
        # Re-normalise: float16 storage moves the norm by ~1e-3.
        return {IMAGE_EMBEDS: F.normalize(emb, dim=-1)}
