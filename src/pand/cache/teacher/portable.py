"""A teacher cache as WebDataset samples, for moving it to machines that train without the teacher (a "reinforced
dataset", as Apple's dataset reinforcement and MobileCLIP's DataCompDR ship theirs), and back into a cache folder.

``pand cache export`` writes one tar per cache shard, ``00000.tar`` ..., each holding one sample per training image:

    <index>.json        {"index": i, "image": the image's key in its dataset (relative path, or <shard>/<key> of a
                         WebDataset input), "label": its label (-1 unlabelled)}
    <index>.params.npy  float32 [K, P]  the augmentation parameters of its K views (replayable)
    <index>.embeds.npy  float16 [K, D]  the teacher's output of each view (or logits.npy, or logits_topk.npy and
                                        logits_index.npy, as the cache stores them)

and beside them ``meta.json`` (the cache's record, with ``export`` naming the tars and the checksum of each tar) and the
class-level files (``text.safetensors``, ``captions.safetensors``). Any WebDataset reader streams the tars; ``pand
cache import`` turns them back into a cache folder whose shards are byte-identical to the exported cache's (each
shard's digests are recomputed and must equal the original checksums in the record), so a run on another machine
opens it like the original, checked against its own copy of the images by the dataset fingerprint.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pand.cache.integrity import CacheDamagedError, read_meta
from pand.cache.teacher.layout import (
    data_arrays,
    open_shard,
    shard_checksums,
    shard_name,
    shard_rows,
    verify_cache,
    write_shard,
)
from pand.cache.teacher.record import CAPTIONS_FILE, checked_meta
from pand.errors import ConfigError, PandError
from pand.io import atomic_write_json, atomic_write_with, file_digest, mark_output_folder

EXPORT_KIND = "teacher_view_cache_webdataset"
_CLASS_FILES = ("text.safetensors", CAPTIONS_FILE)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: the same cache exports to the same bytes
    tar.addfile(info, io.BytesIO(data))


def export_cache(folder: str | os.PathLike, out: str | os.PathLike, image_key: Callable[[int], str],
                 labels: Sequence[int]) -> dict[str, Any]:
    """Write the complete cache in ``folder`` as WebDataset tars in ``out``; ``image_key(i)`` names training image i
    in its dataset. Returns the export's meta.json."""
    folder, out = Path(folder), Path(out)
    meta = checked_meta(folder, verify="full")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} is not empty: export a teacher cache into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    mark_output_folder(out, "teacher-cache-export")
    names = data_arrays(meta)
    tars = {}
    for s in range(int(meta["num_shards"])):
        shard = open_shard(folder, meta, meta["arrays"], s)
        rows = shard_rows(meta, s)

        def write(f, arrays=shard, rows=rows) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for local, i in enumerate(rows):
                    key = f"{i:09d}"
                    record = {"index": i, "image": image_key(i), "label": int(labels[i])}
                    _add(tar, f"{key}.json", json.dumps(record, sort_keys=True).encode())
                    for name in names:
                        _add(tar, f"{key}.{name}.npy", _npy_bytes(arrays[name][local]))

        path = atomic_write_with(out / f"{shard_name(s)}.tar", write)
        tars[path.name] = file_digest(path)
    for name in _CLASS_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    exported = {**meta, "export": {"kind": EXPORT_KIND, "tars": tars, "arrays": names}}
    atomic_write_json(out / "meta.json", exported)  # last: an export without it is unfinished
    return exported


def import_cache(src: str | os.PathLike, folder: str | os.PathLike) -> dict[str, Any]:
    """Rebuild the cache folder ``folder`` from the export in ``src``, byte-identical to the exported cache; refused
    (naming the tar) when a tar is missing, altered or holds other rows. Returns the cache's meta.json."""
    src, folder = Path(src), Path(folder)
    if not (src / "meta.json").is_file():
        raise PandError(f"no teacher cache export at {src} (missing meta.json); `pand cache export` writes one")
    exported = read_meta(src)
    export = exported.get("export") or {}
    if export.get("kind") != EXPORT_KIND:
        raise PandError(f"{src}/meta.json does not describe a teacher cache export (kind {export.get('kind')!r})")
    if (folder / "meta.json").exists():
        raise ConfigError(f"cache.dir={folder} already holds a teacher cache: import into a new folder")
    meta = {k: v for k, v in exported.items() if k not in ("export", "shards", "complete")}
    names = data_arrays(meta)
    folder.mkdir(parents=True, exist_ok=True)
    mark_output_folder(folder, "teacher-cache")
    for name in _CLASS_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    atomic_write_json(folder / "meta.json", {**meta, "complete": False})
    for s in range(int(meta["num_shards"])):
        tar_path = src / f"{shard_name(s)}.tar"
        if not tar_path.is_file():
            raise PandError(f"the teacher cache export at {src} lacks {tar_path.name}")
        if file_digest(tar_path) != export["tars"].get(tar_path.name):
            raise PandError(f"{tar_path} does not match its checksum in {src}/meta.json: it was altered or cut short "
                            "since it was exported")
        write_shard(folder, meta, s, _read_tar(tar_path, meta, s, names))
    sums = shard_checksums(folder, meta)
    if sums != exported.get("shards"):
        differ = sorted(k for k in sums if sums[k] != (exported.get("shards") or {}).get(k))
        raise CacheDamagedError(folder, f"the shards imported from {src} differ from the exported cache's (first: "
                                        f"{differ[0] if differ else '?'})")
    meta = {**meta, "shards": sums, "complete": True}
    verify_cache(folder, meta, verify="full")
    atomic_write_json(folder / "meta.json", meta)
    return meta


def _read_tar(path: Path, meta: dict[str, Any], s: int, names: list[str]) -> dict[str, np.ndarray]:
    rows = shard_rows(meta, s)
    found: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "json" or not ext.endswith(".npy"):
                continue
            name, index = ext[: -len(".npy")], int(key)
            if name not in found or index not in rows:
                raise PandError(f"{path} holds {member.name}, which is not a row of cache shard {shard_name(s)} "
                                f"(rows {rows.start}..{rows.stop - 1})")
            found[name][index] = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    arrays = {}
    for name in names:
        missing = [i for i in rows if i not in found[name]]
        if missing:
            raise PandError(f"{path} lacks {name}.npy of image {missing[0]} ({len(missing)} missing)")
        arrays[name] = np.stack([found[name][i] for i in rows])
    return arrays
