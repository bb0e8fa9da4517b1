"""Integrity and storage of a teacher cache folder: what is checked before a cache is trusted, and how a build
makes sure its disk has room. The folder's layout (shards of rows) is :mod:`pand.cache.teacher.layout`.

Integrity. :meth:`TeacherCache.open` refuses a damaged cache with :class:`CacheDamagedError`, naming the file, the
reason and the remedy (``cache.rebuild=true``, or delete the folder and ``pand cache build``). It checks, in order:

1. meta.json parses as a JSON object and its "arrays" agree with views and the size of the stored outputs
   (embed_dim for image embeddings; num_classes and logits_topk for logits, see :func:`output_arrays`), its
   num_shards with num_samples and shard_size;
2. a CLIP cache's text.safetensors loads, holds [len(classes), embed_dim] and matches its blake2b checksum in
   meta.json (a classifier teacher's cache has no text file);
3. every shard folder exists, its shard.json names the rows it should hold, and each of its array files has a .npy
   header (read with :mod:`numpy.lib.format`, the data is not mapped) with the shape and dtype meta.json implies and
   a size of exactly header + prod(shape) * itemsize (truncated / too long);
4. each shard's digests.npy matches its blake2b checksum in meta.json, then the rows of params and of every output
   array (embeds; or logits; or logits_topk and logits_index) match their digests: every row when those arrays hold
   at most :data:`FULL_CHECK_BYTES` (1 GiB), else :data:`SAMPLE_ROWS` random rows plus the first and the last, drawn
   afresh at each open (``open(..., verify="full")`` forces all rows).

Each process also re-checks the header and size of a shard's arrays before it maps them, so a file cut short after
open() is named instead of failing inside numpy's mmap.

Cost (``python benchmarks/integrity_checks.py``, figures in benchmarks/README.md): for N=6000, K=10, D=1024 (117 MiB
of embeddings in 6 shards of 1,024 rows) steps 1-3 took 2 ms, step 4 over every row 0.19 s and over a sample (4,098
rows) 0.14 s, blake2b on one core of an AMD EPYC with the files in the page cache. Each shard adds about 0.2 ms to
steps 1-3 and 0.9 ms to an open that checks every row (the same rows in 375 shards of 16: 0.07 s and 0.51 s), nothing
at the default shard size. A build digests each row as it writes it, checks every row of a finished shard it finds
when resuming (one whose digests or rows no longer match is built again; one with a file cut short, too long or
missing is refused like a damaged cache), and verifies every row (never a sample) before it marks a cache complete.

Disk space. Before writing any shard a build compares the bytes the cache needs with ``shutil.disk_usage`` and
refuses with both numbers; a full disk while a shard is written is an :class:`~pand.errors.OutputError` naming the
shard, and the unfinished shard is removed. Shards are written with plain writes, never through a memory map, so a
full disk cannot surface later as a SIGBUS.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pand.errors import OutputError, PandError
from pand.io import OUTPUT_ERRNOS, file_digest
from pand.provenance import load_tensors

DIGEST_SIZE = 16  # bytes of blake2b per row and array
FULL_CHECK_BYTES = 1 << 30  # open() verifies every row up to this many bytes of params + outputs, else a sample
SAMPLE_ROWS = 4096
# Room for the text.safetensors header, meta.json and its temporary copy, beyond the exact array sizes.
SLACK_BYTES = 1 << 20


class CacheDamagedError(PandError):
    """A teacher cache folder exists but a file in it is damaged (garbled meta.json, truncated or altered array).

    ``folder`` and ``reason`` are kept as attributes; the message names the file, the reason and the remedy.
    Unlike a missing or incomplete cache (build / resume it) or a :class:`~pand.errors.MismatchError` (made for
    something else), a damaged cache is rebuilt only when asked to (``cache.rebuild=true``).
    """

    def __init__(self, folder: str | os.PathLike, reason: str) -> None:
        self.folder = Path(folder)
        self.reason = reason
        super().__init__(
            f"the teacher cache at {self.folder} is damaged: {reason}.\nRebuild it with cache.rebuild=true (on the "
            f"run or `pand cache build ... cache.rebuild=true`), or delete {self.folder} and run "
            "`pand cache build ...`."
        )


def _bytes(n: int) -> str:
    return f"{n:,} bytes"


def _human(n: int) -> str:
    size, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n:,} bytes" if unit == "bytes" else f"{n:,} bytes ({size:.1f} {unit})"


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def output_arrays(embed_dim: int | None = None, *, num_classes: int | None = None, topk: int | None = None,
                  members: int | None = None, storage: str | None = None) -> dict[str, tuple[int, np.dtype]]:
    """The per-view arrays holding the teacher's outputs, in digest-column order: name -> (row width, dtype).

    Image embeddings (``embed_dim``): embeds. Logits (``num_classes``): logits, all of them; or with ``topk`` the k
    largest and the floor of the rest (logits_topk, k + 1 values) and their class indices (logits_index). A teacher
    ensemble's (``members`` and ``num_classes``): member_logits, the M members' logits side by side (M x C values).
    float16 rows, or with ``storage="int8"`` int8 rows each followed by its scale (``<name>_scale``, one float16;
    :func:`pand.cache.codecs.encode_int8_rows`).
    """
    if embed_dim is not None:
        arrays = {"embeds": (int(embed_dim), np.dtype(np.float16))}
    elif num_classes is None:
        raise ValueError("a teacher cache stores image embeddings (embed_dim) or logits (num_classes)")
    elif members:
        arrays = {"member_logits": (int(members) * int(num_classes), np.dtype(np.float16))}
    elif not topk:
        arrays = {"logits": (int(num_classes), np.dtype(np.float16))}
    else:
        if storage not in (None, "float16"):
            raise ValueError("top-k logits are stored as float16 values and their indices only")
        return {"logits_topk": (int(topk) + 1, np.dtype(np.float16)),
                "logits_index": (int(topk), index_dtype(num_classes))}
    if storage in (None, "float16"):
        return arrays
    if storage != "int8":
        raise ValueError(f"a teacher cache stores its outputs as float16 or int8, not {storage!r}")
    (name, (width, _)), = arrays.items()
    return {name: (width, np.dtype(np.int8)), f"{name}_scale": (1, np.dtype(np.float16))}


def stored_outputs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`output_arrays` a cache's meta.json describes (KeyError if one is missing).

    A meta without "outputs" holds image embeddings (the only kind before format version 3).
    """
    outputs = meta.get("outputs") or ["image_embeds"]
    storage = {"storage": meta["storage"]} if meta.get("storage") else {}
    if "member_logits" in outputs:
        return {"num_classes": int(meta["num_classes"]), "members": int(meta["num_members"]), **storage}
    if "logits" in outputs:
        topk = meta["logits_topk"]
        return {"num_classes": int(meta["num_classes"]), "topk": None if topk is None else int(topk), **storage}
    return {"embed_dim": int(meta["embed_dim"]), **storage}


def output_names(meta: Mapping[str, Any]) -> list[str]:
    """The output arrays' names, from the fewest meta entries (a cache made without "arrays" still names them)."""
    outputs = meta.get("outputs") or ["image_embeds"]
    if "member_logits" in outputs:
        names = ["member_logits"]
    elif "logits" in outputs:
        names = ["logits"] if meta.get("logits_topk") is None else ["logits_topk", "logits_index"]
    else:
        names = ["embeds"]
    return [*names, f"{names[0]}_scale"] if meta.get("storage") == "int8" else names


def npy_header(spec: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": spec["dtype"], "fortran_order": False, "shape": tuple(spec["shape"])}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def data_bytes(spec: Mapping[str, Any]) -> int:
    return math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize


def row_digest(row: np.ndarray) -> bytes:
    """blake2b-128 of one row's bytes (a contiguous row of a C-ordered array or memory map is not copied)."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(row)), digest_size=DIGEST_SIZE).digest()


# -- tensor files --------------------------------------------------------------------------------------------------
#: The record entry of a safetensors artefact (stored teacher features, learned text features) holding the digest of
#: each tensor; a file written before it existed has none and is accepted unchecked.
TENSOR_DIGESTS = "digests"


def tensor_digests(tensors: Mapping[str, Any]) -> dict[str, str]:
    """blake2b-128 (hex) of each tensor's bytes, as :func:`pand.provenance.save_tensors` stores them."""
    return {name: row_digest(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hex()
            for name, t in tensors.items()}


def check_tensor_digests(path: str | os.PathLike, tensors: Mapping[str, Any], record: Mapping[str, Any],
                         hint: str = "") -> None:
    """Raise :class:`~pand.errors.PandError` naming ``path`` when its tensors no longer match the digests in its
    record (bytes altered in place keep a safetensors file readable); a record without digests passes."""
    stored = record.get(TENSOR_DIGESTS)
    if stored is None:
        return
    hint = f"; {hint}" if hint else ""
    if not isinstance(stored, dict) or set(stored) != set(tensors):
        listed = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise PandError(f"{path} is damaged: it holds the tensors {sorted(tensors)} but its record has digests of "
                        f"{listed}{hint}")
    for name, digest in tensor_digests(tensors).items():
        if digest != stored[name]:
            raise PandError(f"{path} is damaged: its tensor {name!r} does not match the digest in its record (the "
                            f"file was altered after it was written){hint}")


# -- verification --------------------------------------------------------------------------------------------------
def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CacheDamagedError(folder, f"meta.json is not UTF-8 text (bad byte at offset {err.start})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        state = "empty" if not text.strip() else f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        raise CacheDamagedError(folder, f"meta.json is {state}: it was cut short or overwritten") from None
    if not isinstance(meta, dict):
        raise CacheDamagedError(folder, f"meta.json holds a JSON {type(meta).__name__}, not an object")
    return meta


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        return tuple(shape), dtype, bool(fortran), f.tell()


def check_array(folder: Path, name: str, spec: Mapping[str, Any]) -> None:
    """Header and size of ``name``.npy against ``spec``, without mapping the data."""
    path, shown = folder / f"{name}.npy", f"{name}.npy"
    if not path.is_file():
        raise CacheDamagedError(folder, f"{shown} is missing")
    try:
        shape, dtype, fortran, offset = _read_npy_header(path)
    except (ValueError, EOFError, SyntaxError, TypeError, UnicodeDecodeError) as err:
        raise CacheDamagedError(folder, f"{shown} has no readable .npy header ({err})") from None
    want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype != want_dtype or shape != want_shape or fortran:
        order = " in Fortran order" if fortran else ""
        raise CacheDamagedError(folder, f"{shown} holds {dtype.name} {list(shape)}{order}, meta.json expects "
                                        f"{want_dtype.name} {list(want_shape)}")
    expected = offset + data_bytes(spec)
    size = path.stat().st_size
    if size < expected:
        raise CacheDamagedError(folder, f"{shown} is {_bytes(size)}, expected {expected:,}: truncated")
    if size > expected:
        raise CacheDamagedError(folder, f"{shown} is {_bytes(size)}, expected {expected:,}: longer than "
                                        "its header says")


def check_text(folder: Path, meta: Mapping[str, Any]) -> None:
    path = folder / "text.safetensors"
    if not path.is_file():
        raise CacheDamagedError(folder, "text.safetensors is missing")
    try:
        tensors, _ = load_tensors(path)
    except PandError as err:
        raise CacheDamagedError(folder, f"text.safetensors cannot be read ({err})") from None
    want = (len(meta.get("classes") or []), int(meta["embed_dim"]))
    text = tensors.get("text_embeds")
    if text is None or tuple(text.shape) != want:
        got = "no 'text_embeds'" if text is None else f"text_embeds {list(text.shape)}"
        raise CacheDamagedError(folder, f"text.safetensors holds {got}, expected text_embeds {list(want)}")
    stored = (meta.get("checksums") or {}).get("text.safetensors")
    if stored != file_digest(path):
        reason = ("text.safetensors does not match its checksum in meta.json (same size, altered content)" if stored
                  else "meta.json has no checksum of text.safetensors")
        raise CacheDamagedError(folder, reason)


def sample_rows(n: int, total_bytes: int, mode: str, size: int | None = None) -> np.ndarray:
    """The rows to check: all of them, or ``size`` (default :data:`SAMPLE_ROWS`) random ones plus the first and the
    last (see the module docstring); ``size`` lets a cache of large rows (the decoded-image cache's chunks) sample
    fewer."""
    if mode not in ("auto", "full", "sample"):
        raise ValueError(f"verify must be 'auto', 'full' or 'sample', not {mode!r}")
    size = SAMPLE_ROWS if size is None else size
    if mode == "full" or (mode == "auto" and total_bytes <= FULL_CHECK_BYTES) or n <= size + 2:
        return np.arange(n)
    # Unseeded on purpose: every open checks other rows, so damage anywhere is found sooner or later.
    picked = np.random.default_rng().choice(n, size=size, replace=False)
    return np.unique(np.concatenate([picked, [0, n - 1]]))


def bad_rows(columns: Mapping[str, np.ndarray], digests: np.ndarray, rows: Iterable[int]) -> dict[str, list]:
    """The rows of each array whose digest differs; ``columns`` maps names to arrays in digest-column order."""
    named = [(f"{name}.npy", array) for name, array in columns.items()]
    bad: dict[str, list] = {name: [] for name, _ in named}
    for i in rows:
        i = int(i)
        for column, (name, array) in enumerate(named):
            if row_digest(array[i]) != digests[i, column].tobytes():
                bad[name].append(i)
    return bad


# -- disk space ----------------------------------------------------------------------------------------------------
def allocation_error(path: Path, nbytes: int, err: OSError) -> OutputError:
    reason = OUTPUT_ERRNOS.get(err.errno, err.strerror or str(err))
    return OutputError(f"cannot write {path} ({nbytes:,} bytes) for the teacher cache: {reason}. Free space there "
                       "or set cache.dir to a folder on a disk with room for the cache")


def check_free_space(folder: Path, needs: Mapping[str, int]) -> None:
    total = sum(needs.values())
    # Files about to be replaced give their space back.
    reclaimed = sum((folder / name).stat().st_size for name in needs if (folder / name).is_file())
    free = shutil.disk_usage(folder).free + reclaimed
    if total > free:
        parts = ", ".join(f"{name} {n:,}" for name, n in needs.items())
        raise OutputError(f"not enough free space for the teacher cache at {folder}: it needs {_human(total)} "
                          f"[in bytes: {parts}] but only {_human(free)} are free there"
                          + (f" (counting {_human(reclaimed)} of old files it replaces)" if reclaimed else "")
                          + ". Free space or set cache.dir to a "
                          "folder on a larger disk")
