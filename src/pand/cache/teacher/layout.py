"""The on-disk layout of a teacher cache (format version 4): one folder of shards, each shard a fixed range of rows.

A shard is a folder ``shards/NNNNN`` holding, for its rows only, ``params.npy``, the output arrays and
``digests.npy``, plus ``shard.json`` (its row range and the checksum of its digests). A build writes a shard into a
temporary folder beside it and renames the folder into place once every file is on disk, so a shard is finished or
absent, never half-written; a killed build loses at most the shards its processes were filling, and the next build
skips every finished one. Shard ``s`` holds rows ``s * shard_size .. (s + 1) * shard_size - 1``; process ``r`` of
``w`` builds the shards ``s`` with ``s % w == r``, so no two processes write one file and none needs a file another
one pre-allocated. A reader maps a shard's arrays the first time it reads one of its rows: a training process opens
the shards its rows fall into, not the whole cache.

Why per-shard ``.npy`` memory maps rather than WebDataset samples, litdata chunks or MDS shards: a training step reads
one view of B random images, and a memory map serves each such row with one page read and no decoding; the sample
formats are built for sequential streaming and would read and decode a whole sample (every view) per image, or a
whole chunk. ``python benchmarks/cache_formats.py`` measures it (the figures are in benchmarks/README.md). The
WebDataset form exists for moving a cache to another machine: ``pand cache export`` / ``pand cache import``.

meta.json records ``shard_size`` and ``num_shards``, and "arrays" gives each array's row shape (without the leading
row count) and dtype. When the cache is complete it also maps every shard to the checksum of its digests.npy
(``shards``), so a shard altered or swapped after the build is found.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pand.cache.integrity import (
    DIGEST_SIZE,
    CacheDamagedError,
    allocation_error,
    bad_rows,
    check_array,
    check_text,
    data_bytes,
    npy_header,
    output_arrays,
    output_names,
    read_meta,
    row_digest,
    sample_rows,
    stored_outputs,
)
from pand.io import OUTPUT_ERRNOS, atomic_write_json, file_digest, fsync_dir

SHARDS = "shards"
SHARD_META = "shard.json"
#: A shard holds at most this many rows, and at most :data:`SHARD_BYTES` of arrays: small enough that a killed build
#: loses little, that several processes each get shards to build, and that a build holds one shard in memory.
MAX_SHARD_ROWS = 1024
SHARD_BYTES = 64 << 20
_PARTIAL = ".partial-"


def row_layout(views: int, num_params: int, embed_dim: int | None = None, *, num_classes: int | None = None,
               topk: int | None = None, members: int | None = None,
               storage: str | None = None) -> dict[str, dict[str, Any]]:
    """Row shape (without the row count) and dtype (as .npy descr) of every array of a shard, in digest-column order
    after params; digests has one column for params and one per output array (see
    :func:`~pand.cache.integrity.output_arrays`)."""
    outputs = output_arrays(embed_dim, num_classes=num_classes, topk=topk, members=members, storage=storage)
    rows = {"params": ([views, num_params], np.float32),
            **{name: ([views, width], dtype) for name, (width, dtype) in outputs.items()},
            "digests": ([1 + len(outputs), DIGEST_SIZE], np.uint8)}
    return {name: {"row": [int(s) for s in shape], "dtype": np.lib.format.dtype_to_descr(np.dtype(dtype))}
            for name, (shape, dtype) in rows.items()}


def default_shard_size(layout: Mapping[str, Mapping[str, Any]]) -> int:
    row_bytes = sum(data_bytes({"shape": spec["row"], "dtype": spec["dtype"]}) for spec in layout.values())
    return max(1, min(MAX_SHARD_ROWS, SHARD_BYTES // max(1, row_bytes)))


def data_arrays(meta: Mapping[str, Any]) -> list[str]:
    """params and the output arrays, in digest-column order (never meta.json's key order, which JSON may sort)."""
    return ["params", *output_names(meta)]


def shard_name(s: int) -> str:
    return f"{s:05d}"


def shard_dir(folder: Path, s: int) -> Path:
    return folder / SHARDS / shard_name(s)


def shard_rows(meta: Mapping[str, Any], s: int) -> range:
    size, n = int(meta["shard_size"]), int(meta["num_samples"])
    return range(s * size, min((s + 1) * size, n))


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size) if num_samples else 0


def shard_spec(spec: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """An array's shape and dtype in a shard of ``rows`` rows (what :func:`check_array` compares)."""
    return {"shape": [rows, *spec["row"]], "dtype": spec["dtype"]}


def shard_bytes(layout: Mapping[str, Mapping[str, Any]], rows: int) -> int:
    return sum(len(npy_header(shard_spec(spec, rows))) + data_bytes(shard_spec(spec, rows))
               for spec in layout.values())


def meta_layout(folder: Path, meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The row layout meta.json promises, checked against its own views, output sizes, shard size and count."""
    try:
        arrays = meta["arrays"]
        n, k = int(meta["num_samples"]), int(meta["views"])
        sizes = stored_outputs(meta)
        p = int(arrays["params"]["row"][1])
        want = row_layout(k, p, **sizes)
        size, count = int(meta["shard_size"]), int(meta["num_shards"])
    except KeyError as err:
        raise CacheDamagedError(folder, f"meta.json has no entry {err}") from None
    except (TypeError, ValueError, IndexError) as err:
        raise CacheDamagedError(folder, f"meta.json has a garbled num_samples, views, outputs, their sizes, shards "
                                        f"or arrays ({err})") from None
    if arrays != want:
        said = ", ".join(f"{key}={value}" for key, value in sizes.items())
        raise CacheDamagedError(folder, f"meta.json's arrays {arrays} disagree with its views={k}, {said} (expected "
                                        f"{want})")
    if size < 1 or count != num_shards(n, size):
        raise CacheDamagedError(folder, f"meta.json's num_shards={count} disagrees with num_samples={n} and "
                                        f"shard_size={size}")
    return want


def check_shard(folder: Path, meta: Mapping[str, Any], layout: Mapping[str, Any], s: int) -> None:
    """A finished shard's shard.json and the header and size of each of its arrays (the data is not read)."""
    where, rows = shard_dir(folder, s), shard_rows(meta, s)
    relative = f"{SHARDS}/{shard_name(s)}"
    if not where.is_dir():
        raise CacheDamagedError(folder, f"{relative} is missing")
    try:
        record = json.loads((where / SHARD_META).read_text(encoding="utf-8"))
        stored_rows = [int(r) for r in record["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheDamagedError(folder, f"{relative}/{SHARD_META} cannot be read ({err})") from None
    if stored_rows != [rows.start, rows.stop]:
        raise CacheDamagedError(folder, f"{relative}/{SHARD_META} holds rows {stored_rows}, expected "
                                        f"{[rows.start, rows.stop]}")
    for name, spec in layout.items():
        check_array(folder, f"{relative}/{name}", shard_spec(spec, len(rows)))


def shard_digests_checksum(folder: Path, s: int) -> str:
    return file_digest(shard_dir(folder, s) / "digests.npy")


def open_shard(folder: Path, meta: Mapping[str, Any], layout: Mapping[str, Any], s: int,
               mode: str = "r") -> dict[str, np.ndarray]:
    """Every array of shard ``s``, memory-mapped after its header and size are checked (so a file cut short is
    named, instead of failing inside numpy's mmap)."""
    check_shard(folder, meta, layout, s)
    arrays = {}
    for name in layout:
        path = shard_dir(folder, s) / f"{name}.npy"
        try:
            arrays[name] = np.load(path, mmap_mode=mode)
        except (OSError, ValueError) as err:
            raise CacheDamagedError(folder, f"{SHARDS}/{shard_name(s)}/{name}.npy cannot be memory-mapped "
                                            f"({err})") from None
    return arrays


def check_shard_rows(folder: Path, meta: Mapping[str, Any], layout: Mapping[str, Any], s: int,
                     checksum: str | None, rows: np.ndarray | None = None, recorded_in: str = "meta.json") -> int:
    """Shard ``s``'s structure, its digests against ``checksum`` (when given; ``recorded_in`` says where it is kept),
    then its ``rows`` (local indices; None: all) against their digests; :class:`CacheDamagedError` names the first
    file that differs. Returns the rows checked."""
    relative = f"{SHARDS}/{shard_name(s)}"
    arrays = open_shard(folder, meta, layout, s)
    if checksum is not None and shard_digests_checksum(folder, s) != checksum:
        raise CacheDamagedError(folder, f"{relative}/digests.npy does not match its checksum in {recorded_in} (same "
                                        "size, altered content)")
    rows = np.arange(len(arrays["digests"])) if rows is None else rows
    columns = {f"{SHARDS}/{shard_name(s)}/{name}": arrays[name] for name in data_arrays(meta)}
    for name, bad in bad_rows(columns, arrays["digests"], rows).items():
        if bad:
            raise CacheDamagedError(folder, f"{name} row {bad[0]} (image {int(shard_rows(meta, s)[bad[0]])}) does not "
                                            f"match its checksum in digests.npy ({len(bad)} of {len(rows)} rows "
                                            "checked differ): the file was altered in place (same size, other "
                                            "content)")
    return len(rows)


def shard_checksums(folder: Path, meta: Mapping[str, Any]) -> dict[str, str]:
    """Every shard's name -> the checksum of its digests.npy, as a complete cache's meta.json records them."""
    return {shard_name(s): shard_digests_checksum(folder, s) for s in range(int(meta["num_shards"]))}


def finished_shards(folder: Path, meta: Mapping[str, Any]) -> list[int]:
    """The shards whose folder exists under its final name (finished by some build; not yet checked)."""
    return [s for s in range(int(meta["num_shards"])) if shard_dir(folder, s).is_dir()]


def finished_rows(folder: Path, meta: Mapping[str, Any] | None = None) -> int:
    """How many rows the finished shards of a (possibly unfinished) cache hold."""
    meta = read_meta(folder) if meta is None else meta
    return sum(len(shard_rows(meta, s)) for s in finished_shards(folder, meta))


def stored_array(folder: str | os.PathLike, name: str, meta: Mapping[str, Any] | None = None) -> np.ndarray:
    """Array ``name`` of every finished shard, in row order, as one in-memory array (for exports and checks; training
    reads rows through :class:`~pand.cache.teacher.TeacherCache`)."""
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    parts = [open_shard(folder, meta, meta["arrays"], s)[name] for s in finished_shards(folder, meta)]
    if not parts:
        spec = meta["arrays"][name]
        return np.empty((0, *spec["row"]), np.dtype(spec["dtype"]))
    return np.concatenate(parts)


def verify_cache(folder: str | os.PathLike, meta: Mapping[str, Any], verify: str = "auto", rows: bool = True) -> int:
    """Raise :class:`CacheDamagedError` naming the first damaged file of a cache (see :mod:`pand.cache.integrity`).

    ``rows=False`` stops after the structural checks of meta.json, the text files and the shards already finished,
    which is what an unfinished build can be held to. Returns the number of rows whose digests were checked.
    """
    folder = Path(folder)
    layout = meta_layout(folder, meta)
    if "embeds" in layout:
        check_text(folder, meta)
    count = int(meta["num_shards"])
    if not rows:
        for s in finished_shards(folder, meta):
            check_shard(folder, meta, layout, s)
        return 0
    sums = meta.get("shards") or {}
    if not isinstance(sums, dict):
        raise CacheDamagedError(folder, f"meta.json's shards is a JSON {type(sums).__name__}, not an object")
    for s in range(count):
        check_shard(folder, meta, layout, s)
        if shard_name(s) not in sums:
            raise CacheDamagedError(folder, f"meta.json has no checksum of {SHARDS}/{shard_name(s)}/digests.npy")
    n = int(meta["num_samples"])
    row_bytes = sum(data_bytes({"shape": layout[a]["row"], "dtype": layout[a]["dtype"]}) for a in data_arrays(meta))
    picked = sample_rows(n, n * row_bytes, verify)
    size, checked = int(meta["shard_size"]), 0
    for s in range(count):
        local = picked[(picked >= s * size) & (picked < (s + 1) * size)] - s * size
        # A shard none of whose rows is drawn still has its digests file checked against meta.json: cheap, and a
        # swapped shard is then found at every open.
        checked += check_shard_rows(folder, meta, layout, s, sums[shard_name(s)], local)
    return checked


def shard_digests(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[rows, A, 16]``: blake2b-128 of each row of each array, in ``arrays``' order (params first)."""
    named = list(arrays.values())
    out = np.empty((len(named[0]), len(named), DIGEST_SIZE), np.uint8)
    for i in range(len(named[0])):
        for column, array in enumerate(named):
            out[i, column] = np.frombuffer(row_digest(array[i]), np.uint8)
    return out


def write_shard(folder: Path, meta: Mapping[str, Any], s: int, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write shard ``s`` (its params and output rows in ``arrays``; the digests are computed here) under a temporary
    name, make every file durable, then rename the folder into place: the shard appears finished or not at all."""
    target = shard_dir(folder, s)
    tmp = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = shard_rows(meta, s)
    digests = shard_digests(arrays)
    try:
        tmp.mkdir(parents=True)
        for name, array in {**arrays, "digests": digests}.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / SHARD_META, {"shard": s, "rows": [rows.start, rows.stop],
                                             "digests": file_digest(tmp / "digests.npy")})
        fsync_dir(tmp)
        # A finished copy already there (another build of the same cache got there first) holds the same rows.
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in OUTPUT_ERRNOS:
            raise allocation_error(target, shard_bytes(meta["arrays"], len(rows)), err) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_cache(folder: Path, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                shard_size: int | None = None) -> dict[str, Any]:
    """Write a complete cache holding ``arrays`` (params and the outputs, every row in memory) with ``meta``'s record
    (views, outputs and their sizes); its meta.json is returned. For benchmarks and imports that have all rows at
    hand; a build computes them shard by shard instead."""
    folder.mkdir(parents=True, exist_ok=True)
    n, p = arrays["params"].shape[0], arrays["params"].shape[2]
    layout = row_layout(int(meta["views"]), p, **stored_outputs(meta))
    size = int(shard_size) if shard_size else default_shard_size(layout)
    meta = {**meta, "num_samples": n, "shard_size": size, "num_shards": num_shards(n, size), "arrays": layout}
    for s in range(int(meta["num_shards"])):
        rows = shard_rows(meta, s)
        write_shard(folder, meta, s, {name: arrays[name][rows.start:rows.stop] for name in data_arrays(meta)})
    meta = {**meta, "shards": shard_checksums(folder, meta), "complete": True}
    atomic_write_json(folder / "meta.json", meta)
    return meta


def partial_shards(folder: Path) -> Iterator[Path]:
    """Temporary shard folders a killed build left behind."""
    root = folder / SHARDS
    if root.is_dir():
        yield from (p for p in root.iterdir() if p.name.startswith(".") and _PARTIAL in p.name)


def remove_cache_files(folder: Path) -> None:
    """Every file a cache of any format version holds (what a rebuild removes), text files included."""
    shutil.rmtree(folder / SHARDS, ignore_errors=True)
    for name in ("params", "embeds", "logits", "logits_topk", "logits_index", "done", "digests"):
        (folder / f"{name}.npy").unlink(missing_ok=True)  # format version 3 and older
    for name in ("text.safetensors", "meta.json"):
        (folder / name).unlink(missing_ok=True)
