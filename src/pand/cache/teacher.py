"""The teacher cache: K augmented views per training image, their parameters and the teacher's embedding of each.

Layout of a cache folder (format version 2):

    meta.json        provenance (teacher, dataset fingerprint, transform, K, seed, ...), ``complete``, the shape and
                     dtype of every array ("arrays") and the checksums of digests.npy and text.safetensors
    params.npy       float32 [N, K, P]  augmentation parameters of every view (replayable with ReplayableAugment)
    embeds.npy       float16 [N, K, D]  L2-normalised teacher image embedding of exactly that view
    done.npy         bool    [N]        rows written so far (a killed build resumes from here)
    digests.npy      uint8   [N, 2, 16] per image: blake2b-128 of its params row ([:, 0]) and its embeds row ([:, 1])
    text.safetensors float32 [C, D]     the class text embeddings of the data config's templates

During training each epoch picks one cached view per image (seeded by seed, epoch and index), the data loader rebuilds
that view for the student from its parameters, and :class:`CachedTeacherSource` returns the stored embedding: the
teacher model is never loaded. A cache made with another teacher, data, transform or format version is refused with the
reason (:class:`~pand.errors.MismatchError`); an unfinished one is never read as complete.

What :meth:`TeacherCache.open` checks, what it costs, and how a build reserves its disk space: see
:mod:`pand.cache.integrity`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pand.cache.integrity import (
    SLACK_BYTES,
    CacheDamagedError,
    allocate_npy,
    allocation_error,
    array_layout,
    bad_rows,
    check_array,
    check_free_space,
    data_bytes,
    file_digest,
    meta_layout,
    npy_header,
    read_meta,
    remove_cache_files,
    row_digest,
    verify_cache,
)
from pand.data import ClassificationDataset
from pand.data.transforms import ReplayableAugment, view_generator
from pand.errors import MismatchError, PandError
from pand.io import OUTPUT_ERRNOS, atomic_write_json
from pand.provenance import check_provenance, load_tensors, save_tensors
from pand.teachers.source import IMAGE_EMBEDS

log = logging.getLogger("pand")

FORMAT_VERSION = 2
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
            arrays = {}
            for name in ("params", "embeds"):
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

    def embeds(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        rows = self.arrays()["embeds"][indices.cpu().numpy(), views.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def text_embeds(self) -> torch.Tensor:
        return load_tensors(self.folder / "text.safetensors")[0]["text_embeds"].float()

    @classmethod
    def open(cls, folder: str | os.PathLike, expected: Mapping[str, Any] | None = None,
             verify: str = "auto") -> TeacherCache:
        """A complete, undamaged cache whose record matches ``expected`` (when given); otherwise a clear refusal.

        Missing or incomplete: :class:`~pand.errors.PandError` (build / resume it). Made for something else, or by
        another cache format version: :class:`~pand.errors.MismatchError`. Damaged: :class:`CacheDamagedError`.
        ``verify`` picks how many rows are checked against their digests: "auto", "full" or "sample".
        """
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise PandError(f"no teacher cache at {folder} (missing meta.json); build it with `pand cache build ...`")
        meta = read_meta(folder)
        if not meta.get("complete"):
            raise PandError(
                f"the teacher cache at {folder} is incomplete (a build was interrupted); run `pand cache build` "
                "with the same settings to resume it"
            )
        if expected is not None:
            check_provenance(folder, meta, expected, keys=[k for k in _CHECKED if k in expected],
                             hint="Build a cache for this run with `pand cache build ...` (or cache.rebuild=true).")
        _check_version(folder, meta)
        verify_cache(folder, meta, verify)
        return cls(folder, meta)

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def _check_existing(cls, folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
        """Raise MismatchError / CacheDamagedError unless the cache in ``folder`` can be kept (complete) or resumed."""
        meta = read_meta(folder)
        check_provenance(folder, meta, record, keys=list(_CHECKED))
        _check_version(folder, meta)
        stored = meta_layout(folder, meta)
        if stored != layout:
            raise MismatchError(f"{folder} was made for something else and is refused:\n  arrays: stored {stored}, "
                                f"expected {dict(layout)}")
        verify_cache(folder, meta, rows=bool(meta.get("complete")))

    @classmethod
    def _create(cls, folder: Path, layout: Mapping[str, Any], meta: Mapping[str, Any], text: torch.Tensor,
                teacher_identity: Mapping, classes: Sequence[str]) -> None:
        needs = {f"{name}.npy": len(npy_header(spec)) + data_bytes(spec) for name, spec in layout.items()}
        text_bytes = text.numel() * text.element_size() + SLACK_BYTES
        needs["text.safetensors and meta.json (estimate)"] = text_bytes
        check_free_space(folder, needs)
        try:
            for name, spec in layout.items():
                allocate_npy(folder / f"{name}.npy", spec)
            path = folder / "text.safetensors"
            try:
                save_tensors(path, {"text_embeds": text}, {"teacher": dict(teacher_identity), "classes": list(classes)})
            except OSError as err:
                if err.errno in OUTPUT_ERRNOS:
                    raise allocation_error(path, text_bytes, err) from err
                raise
            atomic_write_json(folder / "meta.json", {**meta, "checksums": {"text.safetensors": file_digest(path)}})
        except BaseException:
            remove_cache_files(folder)  # nothing half-made is left behind to be resumed
            raise

    @classmethod
    def build(
        cls, folder: str | os.PathLike, record: Mapping[str, Any], dataset: ClassificationDataset,
        augment: ReplayableAugment, teacher_source: nn.Module, text_embeds: torch.Tensor, teacher_identity: Mapping,
        *, embed_dim: int, learned_logit_scale: float, batch_size: int = 64, rank: int = 0, world_size: int = 1, rebuild: bool = False,
        progress: bool = True, barrier=None,
    ) -> TeacherCache | None:
        """Build (or resume) this process's share of the cache: rows ``rank, rank + world_size, ...``.

        ``teacher_source`` maps a batch ``{"image": ...}`` to ``{"image_embeds": ...}`` (a live teacher). The last
        process to finish verifies every row and marks the cache complete; returns the opened cache when complete,
        else None. An existing cache that is damaged (:class:`CacheDamagedError`) or made for something else
        (:class:`~pand.errors.MismatchError`) is refused, or with ``rebuild=True`` deleted and built again; an
        interrupted one is resumed. With several processes, ``barrier(ok) -> bool`` waits for all of them and says
        whether all are ok, so that an error in one makes every process stop instead of waiting forever.
        """
        folder = Path(folder)
        n, k, d = len(dataset), int(record["views"]), int(embed_dim)
        layout = array_layout(n, k, augment.num_params, d)
        failure: BaseException | None = None
        if rank == 0:
            try:
                cls._prepare(folder, record, layout, teacher_identity, text_embeds, d, learned_logit_scale, rebuild)
            except BaseException as err:
                if barrier is None:
                    raise
                failure = err
        _agree(barrier, failure, f"process 0 could not prepare the teacher cache at {folder}; its error says why")
        try:
            cls._fill_share(folder, dataset, augment, teacher_source, int(record["seed"]), k, batch_size, rank,
                            world_size, progress)
        except BaseException as err:
            if barrier is None:
                raise
            failure = err
        _agree(barrier, failure, f"another process failed while building the teacher cache at {folder}; its error "
               "says why")
        if rank == 0 or barrier is None:
            return cls._finish(folder)
        return None

    @classmethod
    def _prepare(cls, folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any], teacher_identity: Mapping,
                 text_embeds: torch.Tensor, d: int, learned_logit_scale: float, rebuild: bool) -> None:
        """Process 0: keep, resume, or (re)create the cache folder's files."""
        meta_path = folder / "meta.json"
        folder.mkdir(parents=True, exist_ok=True)
        if meta_path.is_file():
            try:
                cls._check_existing(folder, record, layout)
            except (MismatchError, CacheDamagedError) as err:
                if not rebuild:
                    raise
                if isinstance(err, CacheDamagedError):
                    why = f"it is damaged ({err.reason})"
                else:
                    why = "it was made for something else (" + str(err).splitlines()[1].strip() + ")"
                log.warning("rebuilding the teacher cache at %s: %s", folder, why)
                remove_cache_files(folder)
        if not meta_path.is_file():
            meta = {**record, "teacher": dict(teacher_identity), "embed_dim": d,
                    "learned_logit_scale": float(learned_logit_scale), "arrays": layout, "complete": False}
            cls._create(folder, layout, meta, text_embeds.float().cpu(), teacher_identity, record["classes"])

    @classmethod
    def _fill_share(cls, folder: Path, dataset: ClassificationDataset, augment: ReplayableAugment,
                    teacher_source: nn.Module, seed: int, k: int, batch_size: int, rank: int, world_size: int,
                    progress: bool) -> None:
        """Compute and write this process's rows that are not written yet (or no longer match their digests)."""
        n = len(dataset)
        params = np.load(folder / "params.npy", mmap_mode="r+")
        embeds = np.load(folder / "embeds.npy", mmap_mode="r+")
        done = np.load(folder / "done.npy", mmap_mode="r+")
        digests = np.load(folder / "digests.npy", mmap_mode="r+")
        share = range(rank, n, world_size)
        todo = [i for i in share if not done[i]]
        written = [i for i in share if done[i]]
        if written and not read_meta(folder).get("complete"):
            # Rows written before an interruption must still match their digests; compute any that do not again.
            bad = bad_rows(params, embeds, digests, written)
            redo = sorted(set(bad["params.npy"]) | set(bad["embeds.npy"]))
            if redo:
                log.warning("the teacher cache at %s: %d written rows no longer match their digests (first: row %d); "
                            "computing them again", folder, len(redo), redo[0])
                todo = sorted(set(todo) | set(redo))
            if todo:
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
            for i in chunk:
                digests[i, 0] = np.frombuffer(row_digest(params[i]), np.uint8)
                digests[i, 1] = np.frombuffer(row_digest(embeds[i]), np.uint8)
            digests.flush()
            done[chunk] = True  # only after the rows and their digests are on disk
            done.flush()
        del params, embeds, done, digests

    @classmethod
    def _finish(cls, folder: Path) -> TeacherCache | None:
        """Once every row is written: verify them all, then mark the cache complete."""
        meta_path = folder / "meta.json"
        if bool(np.all(np.load(folder / "done.npy", mmap_mode="r"))):
            meta = read_meta(folder)
            if meta.get("complete"):
                return cls.open(folder)
            checksums = {**(meta.get("checksums") or {}), "digests.npy": file_digest(folder / "digests.npy")}
            meta = {**meta, "checksums": checksums, "complete": True}
            try:
                verify_cache(folder, meta, verify="full")
            except CacheDamagedError as err:
                raise CacheDamagedError(folder, f"{err.reason} (found when verifying the cache just built, which "
                                                "is left incomplete; is the disk failing?)") from None
            atomic_write_json(meta_path, meta)
            return cls(folder, meta)
        return None


def _agree(barrier, failure: BaseException | None, others_failed: str) -> None:
    """Wait for every process; if any failed, all raise (the failed one its own error), none waits forever."""
    if barrier is None:
        return
    if barrier(failure is None):
        return
    if failure is not None:
        raise failure
    raise PandError(others_failed)


def _check_version(folder: Path, meta: Mapping[str, Any]) -> None:
    if meta.get("version") != FORMAT_VERSION:
        raise MismatchError(f"{folder} was made for something else and is refused:\n  version: stored "
                            f"{meta.get('version')!r}, expected {FORMAT_VERSION} (the cache format changed)\n"
                            "Build it again with cache.rebuild=true.")


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
