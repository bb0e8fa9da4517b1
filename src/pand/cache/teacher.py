"""The teacher cache: K augmented views per training image, their parameters and the teacher's output for each.

Layout of a cache folder (format version 3):

    meta.json        provenance (teacher spec and identity, dataset fingerprint, transform, K, seed, classes, ...),
                     ``outputs`` (what it holds), ``complete``, the shape and dtype of every array ("arrays") and the
                     checksums of digests.npy (and text.safetensors)
    params.npy       float32 [N, K, P]  augmentation parameters of every view (replayable with ReplayableAugment)
    done.npy         bool    [N]        rows written so far (a killed build resumes from here)
    digests.npy      uint8   [N, A, 16] per image: blake2b-128 of its params row ([:, 0]) and of its row of each output
                                        array below, in that order ([:, 1:])

and, for a CLIP teacher (``outputs: ["image_embeds"]``):

    embeds.npy       float16 [N, K, D]  L2-normalised teacher image embedding of exactly that view
    text.safetensors float32 [C, D]     the class text embeddings of the data config's templates

or, for a classifier teacher (``outputs: ["logits"]``; no text file, meta.json has ``num_classes`` and
``logits_topk``):

    logits.npy       float16 [N, K, C]  the teacher's class logits of that view (``cache.topk`` unset, the default)
    logits_topk.npy  float16 [N, K, k+1] with ``cache.topk=k``: the k largest logits, then the floor of the others
    logits_index.npy int16   [N, K, k]  their classes (int32 above 32,767 classes)

Top-k rows are rebuilt exactly as :func:`decode_topk` says: the kept classes get their logits, every other class the
floor ``log(mean(exp(z_j)))`` over the classes not kept, so the softmax at T=1 keeps the kept probabilities and the
left-over mass exactly and spreads that mass evenly.

Which storage (``python benchmarks/cache_logit_storage.py``; teacher logits from a cosine classifier over random
class prototypes with mean top-1 probability 0.85, a half-trained student; per-sample relative error of the KD loss
at T=4 against float32 logits, median / 99th percentile; 4,096 samples):

    C     storage   bytes/view  KD T=4 error       KD T=1 error       KD T=4 with LS (standardize)
    10    float16   20          5.3e-4 / 1.4e-3    3.5e-4 / 1.0e-3    9.1e-5 / 6.3e-4
    10    top-5     22          4.8e-2 / 2.4e-1    2.6e-3 / 2.6e-2    1.1e-1 / 8.3e-1
    100   float16   200         2.1e-4 / 8.7e-4    2.1e-4 / 6.8e-4    2.9e-5 / 1.4e-4
    100   top-10    42          3.8e-1 / 5.3e-1    9.1e-3 / 5.7e-2    6.5e-1 / 1.4
    100   top-20    82          2.9e-1 / 4.2e-1    4.5e-3 / 2.9e-2    3.6e-1 / 8.2e-1
    100   top-50    202         1.2e-1 / 2.1e-1    8.0e-4 / 5.6e-3    1.1e-1 / 2.9e-1
    1000  float16   2000        8.2e-5 / 2.7e-4    2.4e-4 / 1.0e-3    9.6e-6 / 3.9e-5
    1000  top-5     22          6.7e-1 / 7.5e-1    2.3e-2 / 2.3e-1    28 / 54
    1000  top-20    82          6.3e-1 / 6.9e-1    1.4e-2 / 1.3e-1    4.9 / 11
    1000  top-200   802         3.8e-1 / 4.3e-1    1.8e-3 / 1.7e-2    3.9e-1 / 6.8e-1

float16 rows are within 1.4e-3 of float32 for every C; top-k is not, at the temperatures KD uses: at T=4 most of the
softened mass sits outside the top k (94 % outside the top 20 of 1000 classes), and spreading it evenly moves the
loss by 12-67 % (median); logit standardisation z-scores the flattened row and is off by more. So every class count is
stored in full float16 by default (ImageNet-1k at K=10: 25.6 GB, as much as CLIP embeddings of D=1024);
``cache.topk=k`` is for class counts whose full rows do not fit, and then only for KD near T=1 without
``standardize``.

During training each epoch picks one cached view per image (seeded by seed, epoch and index), the data loader rebuilds
that view for the student from its parameters, and :class:`CachedTeacherSource` returns the stored output: the
teacher model is never loaded. A cache made with another teacher (a classifier's weights file is compared by content,
see :func:`pand.engine.teacher_side.teacher_spec`), data, transform, output storage or format version is refused with
the reason (:class:`~pand.errors.MismatchError`); an unfinished one is never read as complete.

``cache.precision`` (fp32, the default; bf16; fp16) runs the teacher under autocast while the cache is built. The
first batch of each build is then also computed in fp32 and the build is refused before it writes a row unless every
row agrees within ``cache.precision_tolerance`` (relative L2 error; embeddings and logits alike): bf16 agrees with
fp32 to about 1 %, 20-45x the error of the cache's own float16 storage, fp16 to 2-6x it (measured, see
:mod:`pand.teachers.precision`). A low-precision cache records ``precision`` (fp32 caches record nothing, so every
older cache still matches) and is refused by a run asking for another precision, like any other setting; the
measured agreement is kept in meta.json (``agreement``, not compared).

What :meth:`TeacherCache.open` checks, what it costs, and how a build reserves its disk space: see
:mod:`pand.cache.integrity`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
    index_dtype,
    meta_layout,
    npy_header,
    output_names,
    read_meta,
    remove_cache_files,
    row_digest,
    verify_cache,
)
from pand.data import ClassificationDataset
from pand.data.device_augment import DeviceShare, loader_share
from pand.data.transforms import ReplayableAugment, image_hw, view_generator
from pand.errors import ConfigError, Interrupted, MismatchError, PandError, PrecisionError
from pand.interrupts import ignore_stop_signals
from pand.io import OUTPUT_ERRNOS, atomic_write_json, mark_output_folder
from pand.locks import FolderLock, remove_if_unused
from pand.provenance import check_provenance, load_tensors, save_tensors
from pand.teachers.precision import DEFAULT_TOLERANCE, AgreementProbe, teacher_autocast
from pand.teachers.source import IMAGE_EMBEDS, LOGITS

log = logging.getLogger("pand")

FORMAT_VERSION = 3
# What must agree between a cache and a run for the run to use it.
_CHECKED = ("kind", "version", "teacher_spec", "outputs", "logits_topk", "dataset", "split", "fingerprint",
            "transform", "views", "seed", "classes", "templates", "precision")
_FLOAT16_MAX = float(np.finfo(np.float16).max)

def encode_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of each row followed by the floor of the rest (``[..., k + 1]``), and their classes.

    The floor is ``log(mean(exp(z_j)))`` over the classes not kept: every one of them gets it back in
    :func:`decode_topk`, so the reconstructed softmax at T=1 keeps the kept classes' probabilities and the left-over
    mass exactly and spreads that mass evenly over the rest.
    """
    z = logits.float()
    num_classes = z.shape[-1]
    if not 0 < k < num_classes:
        raise ValueError(f"top-k storage needs 0 < k < {num_classes} classes, got k={k}")
    top, index = z.topk(k, dim=-1)
    rest = z.scatter(-1, index, float("-inf"))
    floor = torch.logsumexp(rest, dim=-1, keepdim=True) - math.log(num_classes - k)
    return torch.cat([top, floor], dim=-1), index


def decode_topk(values: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float32 ``[..., num_classes]`` logits from :func:`encode_topk`'s values and indices."""
    values = values.float()
    out = values[..., -1:].expand(*values.shape[:-1], int(num_classes)).clone()
    return out.scatter_(-1, index.long(), values[..., :-1])


def choose_view(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the K cached views of ``index`` an epoch uses: seeded, independent across epochs and images."""
    digest = hashlib.blake2b(f"view|{seed}|{epoch}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % views


def logits_topk(setting: int | None, num_classes: int) -> int | None:
    """The k of top-k logit storage for ``cache.topk`` (None: full float16 rows), refused when it keeps every class."""
    if setting is None:
        return None
    k = int(setting)
    if not 0 < k < num_classes:
        raise ConfigError(f"cache.topk={k} is not allowed with {num_classes} classes: expected 1 <= k < "
                          f"{num_classes}, or leave it unset (null) to store every logit in float16")
    return k


def cache_record(
    *, teacher_spec: Mapping[str, Any], dataset: ClassificationDataset, augment: ReplayableAugment, views: int,
    seed: int, templates: Sequence[str] | None, outputs: Sequence[str] = (IMAGE_EMBEDS,), topk: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """What a cache is made of and for. ``outputs``: ``["image_embeds"]`` (a CLIP teacher; ``templates`` make its
    class text embeddings) or ``["logits"]`` (a classifier teacher, stored in full or as the ``topk`` largest).
    ``precision``: of the teacher pass that fills it, recorded only when it is not fp32."""
    outputs = list(outputs)
    if outputs not in ([IMAGE_EMBEDS], [LOGITS]):
        raise ValueError(f"a teacher cache stores ['{IMAGE_EMBEDS}'] or ['{LOGITS}'], not {outputs}")
    record = {
        "kind": "teacher_view_cache",
        "version": FORMAT_VERSION,
        "teacher_spec": dict(teacher_spec),
        "outputs": outputs,
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_samples": len(dataset),
        "transform": augment.describe(),
        "views": int(views),
        "seed": int(seed),
        "classes": list(dataset.classes),
    }
    if outputs == [LOGITS]:
        record["logits_topk"] = logits_topk(topk, len(dataset.classes))
    else:
        record["templates"] = list(templates or [])
    if precision != "fp32":
        record["precision"] = precision
    return record


def _precision_hint(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """Why a cache of another teacher precision is refused, and what to do; empty when the precisions agree."""
    have, want = stored.get("precision", "fp32"), expected.get("precision", "fp32")
    if have == want:
        return ""
    return (f"The cache was built with cache.precision={have}, this run asks for cache.precision={want}: set "
            f"cache.precision={have} to use it, or rebuild it (cache.rebuild=true).")


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
            # precision is compared even when absent from ``expected``: an fp32 run must refuse a bf16 cache
            keys = [k for k in _CHECKED if k in expected or k == "precision"]
            hint = _precision_hint(meta, expected) or \
                "Build a cache for this run with `pand cache build ...` (or cache.rebuild=true)."
            check_provenance(folder, meta, expected, keys=keys, hint=hint)
        _check_version(folder, meta)
        verify_cache(folder, meta, verify)
        return cls(folder, meta)

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def _check_existing(cls, folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
        """Raise MismatchError / CacheDamagedError unless the cache in ``folder`` can be kept (complete) or resumed."""
        meta = read_meta(folder)
        check_provenance(folder, meta, record, keys=list(_CHECKED), hint=_precision_hint(meta, record))
        _check_version(folder, meta)
        stored = meta_layout(folder, meta)
        if stored != layout:
            raise MismatchError(f"{folder} was made for something else and is refused:\n  arrays: stored {stored}, "
                                f"expected {dict(layout)}")
        verify_cache(folder, meta, rows=bool(meta.get("complete")))

    @classmethod
    def _create(cls, folder: Path, layout: Mapping[str, Any], meta: Mapping[str, Any], text: torch.Tensor | None,
                teacher_identity: Mapping, classes: Sequence[str]) -> None:
        """Allocate every array and write meta.json (and a CLIP cache's text.safetensors); ``text`` None: no text."""
        needs = {f"{name}.npy": len(npy_header(spec)) + data_bytes(spec) for name, spec in layout.items()}
        text_bytes = SLACK_BYTES if text is None else text.numel() * text.element_size() + SLACK_BYTES
        needs["meta.json (estimate)" if text is None else "text.safetensors and meta.json (estimate)"] = text_bytes
        check_free_space(folder, needs)
        try:
            for name, spec in layout.items():
                allocate_npy(folder / f"{name}.npy", spec)
            checksums = {}
            if text is not None:
                path = folder / "text.safetensors"
                try:
                    save_tensors(path, {"text_embeds": text},
                                 {"teacher": dict(teacher_identity), "classes": list(classes)})
                except OSError as err:
                    if err.errno in OUTPUT_ERRNOS:
                        raise allocation_error(path, text_bytes, err) from err
                    raise
                checksums["text.safetensors"] = file_digest(path)
            atomic_write_json(folder / "meta.json", {**meta, "checksums": checksums})
        except BaseException:
            remove_cache_files(folder)  # nothing half-made is left behind to be resumed
            raise

    @classmethod
    def build(
        cls, folder: str | os.PathLike, record: Mapping[str, Any], dataset: ClassificationDataset,
        augment: ReplayableAugment, teacher_source: nn.Module, text_embeds: torch.Tensor | None,
        teacher_identity: Mapping, *, embed_dim: int | None = None, learned_logit_scale: float | None = None,
        batch_size: int = 64, rank: int = 0, world_size: int = 1, rebuild: bool = False, progress: bool = True,
        barrier=None, precision_tolerance: float = DEFAULT_TOLERANCE, augment_on: str = "cpu", num_workers: int = 0,
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
        """
        folder = Path(folder)
        probe = AgreementProbe(record.get("precision", "fp32"), precision_tolerance, setting="cache",
                               what=f"the teacher cache at {folder} ({record['outputs'][0]})")
        folder_existed = folder.exists()
        created = False
        n, k = len(dataset), int(record["views"])
        if LOGITS in record["outputs"]:
            extra: dict[str, Any] = {"num_classes": len(record["classes"])}
            layout = array_layout(n, k, augment.num_params, num_classes=extra["num_classes"],
                                  topk=record["logits_topk"])
            text = None
        else:
            if text_embeds is None or embed_dim is None or learned_logit_scale is None:
                raise ValueError("a cache of image embeddings needs text_embeds, embed_dim and learned_logit_scale")
            extra = {"embed_dim": int(embed_dim), "learned_logit_scale": float(learned_logit_scale)}
            layout = array_layout(n, k, augment.num_params, int(embed_dim))
            text = text_embeds.float().cpu()
        failure: BaseException | None = None
        # One build writes a cache folder at a time: a second build of it (same settings) waits, then finds the rows
        # done and opens the cache; without the lock it could rebuild or rewrite rows under the first one. Process 0
        # holds it for the whole build, the other processes of the same launch follow it through the barriers.
        lock = FolderLock(folder, "teacher cache") if rank == 0 else None
        try:
            if lock is not None:
                try:
                    lock.acquire(wait=True)
                    mark_output_folder(folder, "teacher-cache")
                    created = cls._prepare(folder, record, layout, teacher_identity, text, extra, rebuild)
                except BaseException as err:
                    if barrier is None or isinstance(err, Interrupted):
                        raise
                    failure = err
            _agree(barrier, failure, f"process 0 could not prepare the teacher cache at {folder}; its error says why")
            try:
                try:
                    cls._fill_share(folder, dataset, augment, teacher_source, int(record["seed"]), k, batch_size,
                                    rank, world_size, progress, probe, augment_on, num_workers)
                except Interrupted as stop:
                    done = int(np.count_nonzero(np.load(folder / "done.npy", mmap_mode="r")))
                    raise stop.with_saved(f"{done} of {len(dataset)} images of the teacher cache at {folder} (every "
                                          "finished chunk is kept, and the next build continues from there)") from None
                except BaseException as err:
                    if barrier is None:
                        raise
                    failure = err
                _agree(barrier, failure, f"another process failed while building the teacher cache at {folder}; "
                       "its error says why")
            except PrecisionError:
                if created:  # refused before any row was written: leave no cache behind, as if never started
                    remove_cache_files(folder)
                raise
            if rank == 0 or barrier is None:
                return cls._finish(folder, probe.stats)
            return None
        finally:
            if lock is not None:
                lock.release()
                if not folder_existed:  # a build that failed before writing anything leaves no folder behind
                    remove_if_unused(folder)

    @classmethod
    def _prepare(cls, folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any], teacher_identity: Mapping,
                 text: torch.Tensor | None, extra: Mapping[str, Any], rebuild: bool) -> bool:
        """Process 0: keep, resume, or (re)create the cache folder's files; whether it created them."""
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
            meta = {**record, "teacher": dict(teacher_identity), **extra, "arrays": layout, "complete": False}
            cls._create(folder, layout, meta, text, teacher_identity, record["classes"])
            return True
        return False

    @classmethod
    def _fill_share(cls, folder: Path, dataset: ClassificationDataset, augment: ReplayableAugment,
                    teacher_source: nn.Module, seed: int, k: int, batch_size: int, rank: int, world_size: int,
                    progress: bool, probe: AgreementProbe, augment_on: str, num_workers: int) -> None:
        """Compute and write this process's rows that are not written yet (or no longer match their digests).

        ``probe`` runs the teacher in its precision and checks the first batch against fp32."""
        n = len(dataset)
        meta = read_meta(folder)
        key = LOGITS if LOGITS in (meta.get("outputs") or []) else IMAGE_EMBEDS
        # params first, then the output arrays: the order of the digest columns
        columns = {name: np.load(folder / f"{name}.npy", mmap_mode="r+") for name in ("params", *output_names(meta))}
        done = np.load(folder / "done.npy", mmap_mode="r+")
        digests = np.load(folder / "digests.npy", mmap_mode="r+")
        share = range(rank, n, world_size)
        todo = [i for i in share if not done[i]]
        written = [i for i in share if done[i]]
        if written and not meta.get("complete"):
            # Rows written before an interruption must still match their digests; compute any that do not again.
            bad = bad_rows(columns, digests, written)
            redo = sorted(set().union(*bad.values()))
            if redo:
                log.warning("the teacher cache at %s: %d written rows no longer match their digests (first: row %d); "
                            "computing them again", folder, len(redo), redo[0])
                todo = sorted(set(todo) | set(redo))
            if todo:
                log.info("resuming the teacher cache at %s: %d of %d images left", folder, len(todo), n)
        device = next(iter(teacher_source.parameters()), torch.zeros(())).device
        finish_views = DeviceShare(augment, augment_on)
        chunks = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
        # Worker processes decode the images and make the views (or crop windows) of whole chunks while this process
        # runs the teacher on the previous one; every view is a pure function of (seed, view, index), so the cache is
        # the same with any number of workers. The loader gets its own generator: it would otherwise seed itself from
        # the global one, and a run that builds its cache would then train differently from a run that opens it.
        loader: Iterable = DataLoader(
            _ChunkViews(dataset, augment, augment_on, seed, k, chunks), batch_size=None, num_workers=num_workers,
            prefetch_factor=2 if num_workers else None, pin_memory=device.type == "cuda",
            generator=torch.Generator(), worker_init_fn=ignore_stop_signals if num_workers else None)
        if progress:
            from rich.progress import track

            loader = track(loader, total=len(chunks), description=f"teacher cache ({k} views, rank {rank})")
        for chunk, params, pixels in loader:
            for v in range(k):
                batch = finish_views(pixels[v], params[v], device)
                out = probe(lambda p, batch=batch: _teacher_outputs(teacher_source, batch, key, p))
                columns["params"][chunk, v] = params[v].numpy()
                for name, rows in _stored_rows(out.float().cpu(), meta, chunk, v).items():
                    columns[name][chunk, v] = rows
            for array in columns.values():
                array.flush()
            for i in chunk:
                for column, array in enumerate(columns.values()):
                    digests[i, column] = np.frombuffer(row_digest(array[i]), np.uint8)
            digests.flush()
            done[chunk] = True  # only after the rows and their digests are on disk
            done.flush()
        del columns, done, digests

    @classmethod
    def _finish(cls, folder: Path, agreement: Mapping[str, Any] | None = None) -> TeacherCache | None:
        """Once every row is written: verify them all, then mark the cache complete (with the low-precision probe's
        ``agreement`` stats, when there are any)."""
        meta_path = folder / "meta.json"
        if bool(np.all(np.load(folder / "done.npy", mmap_mode="r"))):
            meta = read_meta(folder)
            if meta.get("complete"):
                return cls.open(folder)
            checksums = {**(meta.get("checksums") or {}), "digests.npy": file_digest(folder / "digests.npy")}
            meta = {**meta, "checksums": checksums, "complete": True}
            if agreement is not None:
                meta["agreement"] = dict(agreement)
            try:
                verify_cache(folder, meta, verify="full")
            except CacheDamagedError as err:
                raise CacheDamagedError(folder, f"{err.reason} (found when verifying the cache just built, which "
                                                "is left incomplete; is the disk failing?)") from None
            atomic_write_json(meta_path, meta)
            return cls(folder, meta)
        return None


class _ChunkViews(Dataset):
    """Item c: chunk c's image indices, and the params ``[K, B, P]`` and views or crop windows ``[K, B, 3, S, S]`` of
    its K views (view v of image i drawn from ``view_generator(seed, v, i)``); each image is loaded once."""

    def __init__(self, dataset: ClassificationDataset, augment: ReplayableAugment, augment_on: str, seed: int,
                 views: int, chunks: Sequence[Sequence[int]]) -> None:
        self.dataset, self.augment, self.seed, self.views, self.chunks = dataset, augment, seed, views, chunks
        self.make = loader_share(augment, augment_on)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, c: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        chunk = list(self.chunks[c])
        images = [self.dataset.load_image(i) for i in chunk]
        params, pixels = [], []
        for v in range(self.views):
            ps = [self.augment.sample(view_generator(self.seed, v, i), image_hw(im)) for i, im in zip(chunk, images)]
            params.append(torch.stack(ps))
            pixels.append(torch.stack([self.make(im, p) for im, p in zip(images, ps)]))
        return chunk, torch.stack(params), torch.stack(pixels)


def _teacher_outputs(teacher_source: nn.Module, images: torch.Tensor, key: str, precision: str) -> torch.Tensor:
    """The teacher's ``key`` output of a batch of views, under ``precision``'s autocast."""
    with torch.no_grad(), teacher_autocast(images.device, precision):
        return teacher_source({"image": images}, {key})[key]


def _stored_rows(out: torch.Tensor, meta: Mapping[str, Any], chunk: Sequence[int], view: int) -> dict[str, np.ndarray]:
    """A batch of teacher outputs (float32 on the CPU) as the rows of the cache's output arrays."""
    if LOGITS not in (meta.get("outputs") or []):
        return {"embeds": out.numpy().astype(np.float16)}
    num_classes = int(meta["num_classes"])
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise PandError(f"the teacher gave logits of shape {list(out.shape)}; the cache holds {num_classes} classes")
    # float16 turns logits beyond +-65504 into inf (and keeps NaN): refuse here rather than train on them
    bad = ~torch.isfinite(out).all(dim=1) | (out.abs() > _FLOAT16_MAX).any(dim=1)
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        raise PandError(f"the teacher's logits of image {chunk[first]} (view {view}) are not finite or beyond "
                        f"float16's range (|z| <= {_FLOAT16_MAX:g}), which the cache stores; check the teacher's "
                        "weights, or run it live (remove cache.dir)")
    topk = meta.get("logits_topk")
    if topk is None:
        return {"logits": out.numpy().astype(np.float16)}
    values, index = encode_topk(out, int(topk))
    return {"logits_topk": values.numpy().astype(np.float16),
            "logits_index": index.numpy().astype(index_dtype(num_classes))}


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
                            "Rebuild it: set cache.rebuild=true (on the run or `pand cache build ...`), or delete "
                            f"{folder} and run `pand cache build ...`.")


class CachedTeacherSource(nn.Module):
    """Teacher outputs read from a :class:`TeacherCache` by the batch's ``index`` and ``view``: a CLIP teacher's
    ``image_embeds`` or a classifier teacher's ``logits`` (float32 ``[B, C]``), whichever the cache holds."""

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
        return out
