"""Building (or resuming) a teacher cache: process 0 prepares the folder under its lock, every process runs the
teacher on its share of the shards (views made by worker processes; each shard written whole, with its digests, and
renamed into place), and process 0 verifies every row before the cache is marked complete. What gets built, and the
agreement check of a low-precision build: see :mod:`pand.cache.teacher`; the layout: :mod:`pand.cache.teacher.layout`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pand.cache.codecs import encode_int8_rows
from pand.cache.integrity import (
    SLACK_BYTES,
    CacheDamagedError,
    allocation_error,
    check_free_space,
    index_dtype,
    read_meta,
)
from pand.cache.teacher.layout import (
    SHARD_META,
    check_shard_rows,
    data_arrays,
    default_shard_size,
    finished_shards,
    meta_layout,
    num_shards,
    partial_shards,
    remove_cache_files,
    row_layout,
    shard_bytes,
    shard_checksums,
    shard_dir,
    shard_name,
    shard_rows,
    verify_cache,
    write_shard,
)
from pand.cache.teacher.record import (
    CAPTIONS_FILE,
    CHECKED,
    check_captions_file,
    check_version,
    checked_meta,
    encode_topk,
    precision_hint,
)
from pand.data import ClassificationDataset
from pand.data.device_augment import DeviceShare, loader_share
from pand.data.transforms import ReplayableAugment, image_hw, view_generator
from pand.errors import Interrupted, MismatchError, PandError, PrecisionError
from pand.interrupts import ignore_stop_signals
from pand.io import OUTPUT_ERRNOS, atomic_write_json, file_digest, mark_output_folder, read_json
from pand.locks import FolderLock, remove_if_unused
from pand.logs import tracked
from pand.provenance import check_provenance, save_tensors
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, MEMBER_LOGITS
from pand.teachers.precision import AgreementProbe, teacher_autocast

log = logging.getLogger("pand")

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def build_cache(
    folder: str | os.PathLike, record: Mapping[str, Any], dataset: ClassificationDataset, augment: ReplayableAugment,
    teacher_source: nn.Module, text_embeds: torch.Tensor | None, teacher_identity: Mapping, *,
    embed_dim: int | None, learned_logit_scale: float | None, batch_size: int, rank: int, world_size: int,
    rebuild: bool, progress: bool, barrier, precision_tolerance: float, augment_on: str, num_workers: int,
    caption_embeds: torch.Tensor | None = None, shard_size: int | None = None, num_members: int | None = None,
) -> dict[str, Any] | None:
    """:meth:`TeacherCache.build <pand.cache.teacher.TeacherCache.build>`'s work (its docstring says what it does),
    short of wrapping the result: the meta.json of the complete cache, else None."""
    folder = Path(folder)
    probe = AgreementProbe(record.get("precision", "fp32"), precision_tolerance, setting="cache",
                           what=f"the teacher cache at {folder} ({record['outputs'][0]})")
    folder_existed = folder.exists()
    created = False
    k = int(record["views"])
    if MEMBER_LOGITS in record["outputs"]:
        if not num_members:
            raise ValueError("a cache of a teacher ensemble's member logits needs num_members")
        extra: dict[str, Any] = {"num_classes": len(record["classes"]), "num_members": int(num_members)}
        layout = row_layout(k, augment.num_params, num_classes=extra["num_classes"], members=int(num_members),
                            storage=record.get("storage"))
        text = None
    elif LOGITS in record["outputs"]:
        extra = {"num_classes": len(record["classes"])}
        layout = row_layout(k, augment.num_params, num_classes=extra["num_classes"], topk=record["logits_topk"],
                            storage=record.get("storage"))
        text = None
    else:
        if text_embeds is None or embed_dim is None or learned_logit_scale is None:
            raise ValueError("a cache of image embeddings needs text_embeds, embed_dim and learned_logit_scale")
        extra = {"embed_dim": int(embed_dim), "learned_logit_scale": float(learned_logit_scale)}
        layout = row_layout(k, augment.num_params, int(embed_dim), storage=record.get("storage"))
        text = text_embeds.float().cpu()
    if (record.get("captions") is None) != (caption_embeds is None):
        raise ValueError("a record with captions goes with their embeddings, and only then")
    captions = None if caption_embeds is None else caption_embeds.half().cpu()
    if captions is not None:
        extra["num_captions"] = int(captions.shape[0])
    size = int(shard_size) if shard_size else default_shard_size(layout)
    extra.update(shard_size=size, num_shards=num_shards(len(dataset), size))
    failure: BaseException | None = None
    # One build writes a cache folder at a time: a second build of it (same settings) waits, then finds the shards
    # done and opens the cache; without the lock it could rebuild or rewrite shards under the first one. Process 0
    # holds it for the whole build, the other processes of the same launch follow it through the barriers.
    lock = FolderLock(folder, "teacher cache") if rank == 0 else None
    try:
        if lock is not None:
            try:
                lock.acquire(wait=True)
                mark_output_folder(folder, "teacher-cache")
                created = _prepare(folder, record, layout, teacher_identity, text, extra, rebuild, captions)
            except BaseException as err:
                if barrier is None or isinstance(err, Interrupted):
                    raise
                failure = err
        _agree(barrier, failure, f"process 0 could not prepare the teacher cache at {folder}; its error says why")
        meta = read_meta(folder)
        try:
            try:
                _fill_share(folder, meta, dataset, augment, teacher_source, batch_size, rank, world_size, progress,
                            probe, augment_on, num_workers)
            except Interrupted as stop:
                done = sum(len(shard_rows(meta, s)) for s in finished_shards(folder, meta))
                raise stop.with_saved(f"{done} of {len(dataset)} images of the teacher cache at {folder} (every "
                                      "finished shard is kept, and the next build continues from there)") from None
            except BaseException as err:
                if barrier is None:
                    raise
                failure = err
            _agree(barrier, failure, f"another process failed while building the teacher cache at {folder}; "
                   "its error says why")
        except PrecisionError:
            if created:  # refused before any shard was written: leave no cache behind, as if never started
                _remove_all(folder)
            raise
        if barrier is None:
            return _finish(folder, probe.stats)
        complete = None
        if rank == 0:
            try:
                complete = _finish(folder, probe.stats)
            except BaseException as err:
                failure = err
        _agree(barrier, failure, f"process 0 could not complete the teacher cache at {folder}; its error says why")
        # process 0 has just verified every row: the others read its verdict instead of verifying again
        return complete if rank == 0 else read_meta(folder)
    finally:
        if lock is not None:
            lock.release()
            if not folder_existed:  # a build that failed before writing anything leaves no folder behind
                remove_if_unused(folder)


def _remove_all(folder: Path) -> None:
    """Every file of a cache, its caption embeddings included."""
    remove_cache_files(folder)
    (folder / CAPTIONS_FILE).unlink(missing_ok=True)


def _prepare(folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any], teacher_identity: Mapping,
             text: torch.Tensor | None, extra: Mapping[str, Any], rebuild: bool,
             captions: torch.Tensor | None = None) -> bool:
    """Process 0: keep, resume, or (re)create the cache folder's files; whether it created them."""
    meta_path = folder / "meta.json"
    folder.mkdir(parents=True, exist_ok=True)
    for partial in partial_shards(folder):  # shards a killed build was writing: never finished, never read
        shutil.rmtree(partial, ignore_errors=True)
    if meta_path.is_file():
        try:
            _check_existing(folder, record, layout)
        except (MismatchError, CacheDamagedError) as err:
            if not rebuild:
                raise
            if isinstance(err, CacheDamagedError):
                why = f"it is damaged ({err.reason})"
            else:
                why = "it was made for something else (" + str(err).splitlines()[1].strip() + ")"
            log.warning("rebuilding the teacher cache at %s: %s", folder, why)
            _remove_all(folder)
    if not meta_path.is_file():
        meta = {**record, "teacher": dict(teacher_identity), **extra, "arrays": layout, "complete": False}
        _create(folder, layout, meta, text, teacher_identity, record["classes"], captions)
        return True
    return False


def _check_existing(folder: Path, record: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
    """Raise MismatchError / CacheDamagedError unless the cache in ``folder`` can be kept (complete) or resumed.

    A resumed cache keeps its own shard size (``cache.shard_size`` applies to a new cache)."""
    meta = read_meta(folder)
    check_provenance(folder, meta, record, keys=list(CHECKED), hint=precision_hint(meta, record))
    check_version(folder, meta)
    stored = meta_layout(folder, meta)
    if stored != layout:
        raise MismatchError(f"{folder} was made for something else and is refused:\n  arrays: stored {stored}, "
                            f"expected {dict(layout)}")
    verify_cache(folder, meta, rows=bool(meta.get("complete")))
    check_captions_file(folder, meta)


def _create(folder: Path, layout: Mapping[str, Any], meta: Mapping[str, Any], text: torch.Tensor | None,
            teacher_identity: Mapping, classes: Sequence[str], captions: torch.Tensor | None = None) -> None:
    """Check the disk has room for every shard, then write meta.json (and a CLIP cache's text.safetensors, and its
    captions file when given); ``text`` None: no text."""
    size, n = int(meta["shard_size"]), int(meta["num_samples"])
    full, last = divmod(n, size)
    needs = {"shards": full * shard_bytes(layout, size) + (shard_bytes(layout, last) if last else 0)}
    text_bytes = SLACK_BYTES if text is None else text.numel() * text.element_size() + SLACK_BYTES
    needs["meta.json (estimate)" if text is None else "text.safetensors and meta.json (estimate)"] = text_bytes
    if captions is not None:
        needs[CAPTIONS_FILE] = captions.numel() * captions.element_size() + SLACK_BYTES
    check_free_space(folder, needs)
    try:
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
        if captions is not None:
            path = folder / CAPTIONS_FILE
            try:
                save_tensors(path, {"caption_embeds": captions},
                             {"teacher": dict(teacher_identity), "captions": meta["captions"]})
            except OSError as err:
                if err.errno in OUTPUT_ERRNOS:
                    raise allocation_error(path, needs[CAPTIONS_FILE], err) from err
                raise
            checksums[CAPTIONS_FILE] = file_digest(path)
        atomic_write_json(folder / "meta.json", {**meta, "checksums": checksums})
    except BaseException:
        _remove_all(folder)  # nothing half-made is left behind to be resumed
        raise


def _shards_to_build(folder: Path, meta: Mapping[str, Any], rank: int, world_size: int) -> list[int]:
    """This process's shards (``s % world_size == rank``) that are not finished, or whose rows no longer match their
    digests (those are removed, to be built again)."""
    layout = meta["arrays"]
    todo = []
    for s in range(rank, int(meta["num_shards"]), world_size):
        path = shard_dir(folder, s)
        if not path.is_dir():
            todo.append(s)
            continue
        if meta.get("complete"):
            continue  # verified as a whole when the cache was opened or completed
        try:
            record = read_json(path / SHARD_META, f"the shard record {path / SHARD_META}")
            check_shard_rows(folder, meta, layout, s, record.get("digests"), recorded_in=SHARD_META)
        except (CacheDamagedError, PandError) as err:
            log.warning("the teacher cache at %s: finished shard %s is damaged (%s); building it again", folder,
                        shard_name(s), getattr(err, "reason", err))
            shutil.rmtree(path, ignore_errors=True)
            todo.append(s)
    return todo


def _fill_share(folder: Path, meta: Mapping[str, Any], dataset: ClassificationDataset, augment: ReplayableAugment,
                teacher_source: nn.Module, batch_size: int, rank: int, world_size: int, progress: bool,
                probe: AgreementProbe, augment_on: str, num_workers: int) -> None:
    """Compute and write this process's shards that are not finished yet (or were found damaged).

    ``probe`` runs the teacher in its precision and checks the first batch against fp32."""
    n, k, seed = len(dataset), int(meta["views"]), int(meta["seed"])
    key = (meta.get("outputs") or [IMAGE_EMBEDS])[0]
    layout = meta["arrays"]
    shards = _shards_to_build(folder, meta, rank, world_size)
    mine = len(range(rank, int(meta["num_shards"]), world_size))
    if shards and len(shards) < mine:
        left = sum(len(shard_rows(meta, s)) for s in shards)
        log.info("resuming the teacher cache at %s: %d of %d images left (rank %d)", folder, left, n, rank)
    if world_size > 1:
        log.info("teacher cache: process %d of %d builds %d of %d shards: %s", rank, world_size, len(shards),
                 int(meta["num_shards"]), ",".join(map(str, shards)) or "none left")
    device = next(iter(teacher_source.parameters()), torch.zeros(())).device
    finish_views = DeviceShare(augment, augment_on)
    # Chunks never cross a shard, so a shard's rows are computed in the same batches whichever process builds it
    # (the cache is byte-identical with any number of processes).
    chunks = [(s, list(rows[c : c + batch_size])) for s in shards for rows in [shard_rows(meta, s)]
              for c in range(0, len(rows), batch_size)]
    # Worker processes decode the images and make the views (or crop windows) of whole chunks while this process
    # runs the teacher on the previous one; every view is a pure function of (seed, view, index), so the cache is
    # the same with any number of workers. The loader gets its own generator: it would otherwise seed itself from
    # the global one, and a run that builds its cache would then train differently from a run that opens it.
    loader: Iterable = DataLoader(
        _ChunkViews(dataset, augment, augment_on, seed, k, [rows for _, rows in chunks]), batch_size=None,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None, pin_memory=device.type == "cuda",
        generator=torch.Generator(), worker_init_fn=ignore_stop_signals if num_workers else None)
    buffers: dict[str, np.ndarray] = {}
    with tracked(loader, progress, total=len(chunks), description=f"teacher cache ({k} views, rank {rank})") as steps:
        for c, (chunk, params, pixels) in enumerate(steps):
            s = chunks[c][0]
            rows = shard_rows(meta, s)
            if not buffers:
                buffers = {name: np.empty((len(rows), *spec["row"]), np.dtype(spec["dtype"]))
                           for name, spec in layout.items() if name != "digests"}
            local = [i - rows.start for i in chunk]
            for v in range(k):
                batch = finish_views(pixels[v], params[v], device)
                out = probe(lambda p, batch=batch: _teacher_outputs(teacher_source, batch, key, p))
                buffers["params"][local, v] = params[v].numpy()
                for name, values in _stored_rows(out.float().cpu(), meta, chunk, v).items():
                    buffers[name][local, v] = values
            if chunk[-1] == rows.stop - 1:  # the shard's last chunk: write it whole, then start the next one
                write_shard(folder, meta, s, {name: buffers[name] for name in data_arrays(meta)})
                buffers = {}


def _finish(folder: Path, agreement: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Once every shard is written: verify every row, then mark the cache complete (with the low-precision probe's
    ``agreement`` stats, when there are any); the complete cache's meta.json, else None."""
    meta_path = folder / "meta.json"
    meta = read_meta(folder)
    if len(finished_shards(folder, meta)) < int(meta["num_shards"]):
        return None
    if meta.get("complete"):
        return checked_meta(folder)
    meta = {**meta, "shards": shard_checksums(folder, meta), "complete": True}
    if agreement is not None:
        meta["agreement"] = dict(agreement)
    try:
        verify_cache(folder, meta, verify="full")
        check_captions_file(folder, meta)
    except CacheDamagedError as err:
        raise CacheDamagedError(folder, f"{err.reason} (found when verifying the cache just built, which "
                                        "is left incomplete; is the disk failing?)") from None
    atomic_write_json(meta_path, meta)
    return meta


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
    """The teacher's ``key`` output of a batch of views, under ``precision``'s autocast, one row per view (an
    ensemble's ``[B, M, C]`` member logits flattened to ``[B, M * C]``, as they are stored and compared)."""
    with torch.no_grad(), teacher_autocast(images.device, precision):
        return teacher_source({"image": images}, {key})[key].flatten(1)


def _stored_rows(out: torch.Tensor, meta: Mapping[str, Any], chunk: Sequence[int], view: int) -> dict[str, np.ndarray]:
    """A batch of teacher outputs (float32 on the CPU) as the rows of the cache's output arrays."""
    rows = _float16_rows(out, meta, chunk, view)
    if meta.get("storage") != "int8":
        return rows
    (name, values), = rows.items()
    # encoded from the float16 values, so that an int8 cache decodes to within half a step of the float16 one
    q, scale = encode_int8_rows(values.astype(np.float32))
    return {name: q, f"{name}_scale": scale}


def _float16_rows(out: torch.Tensor, meta: Mapping[str, Any], chunk: Sequence[int], view: int) -> dict[str, np.ndarray]:
    outputs = meta.get("outputs") or [IMAGE_EMBEDS]
    if IMAGE_EMBEDS in outputs:
        return {"embeds": out.numpy().astype(np.float16)}
    members = int(meta.get("num_members") or 1) if MEMBER_LOGITS in outputs else 1
    num_classes = int(meta["num_classes"])
    if out.dim() != 2 or out.shape[1] != members * num_classes:
        raise PandError(f"the teacher gave logits of shape {list(out.shape)}; the cache holds {num_classes} classes"
                        + (f" of {members} members" if MEMBER_LOGITS in outputs else ""))
    # float16 turns logits beyond +-65504 into inf (and keeps NaN): refuse here rather than train on them
    bad = ~torch.isfinite(out).all(dim=1) | (out.abs() > _FLOAT16_MAX).any(dim=1)
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        raise PandError(f"the teacher's logits of image {chunk[first]} (view {view}) are not finite or beyond "
                        f"float16's range (|z| <= {_FLOAT16_MAX:g}), which the cache stores; check the teacher's "
                        "weights, or run it live (remove cache.dir)")
    if MEMBER_LOGITS in outputs:
        return {"member_logits": out.numpy().astype(np.float16)}
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
