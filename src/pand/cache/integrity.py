"""Integrity and storage of a teacher cache folder: what is checked before a cache is trusted, and how a build
reserves its disk space.

Integrity. :meth:`TeacherCache.open` refuses a damaged cache with :class:`CacheDamagedError`, naming the file, the
reason and the remedy (``cache.rebuild=true``, or delete the folder and ``pand cache build``). It checks, in order:

1. meta.json parses as a JSON object and its "arrays" agree with num_samples, views and the size of the stored
   outputs (embed_dim for image embeddings; num_classes and logits_topk for logits, see :func:`output_arrays`);
2. every array file exists, its .npy header (read with :mod:`numpy.lib.format`, the data is not mapped) holds the
   shape and dtype meta.json names, and its size is exactly header + prod(shape) * itemsize (truncated / too long);
3. a CLIP cache's text.safetensors loads, holds [len(classes), embed_dim] and matches its blake2b checksum in
   meta.json (a classifier teacher's cache has no text file);
4. done.npy marks every row written;
5. digests.npy matches its blake2b checksum in meta.json, then the rows of params and of every output array (embeds;
   or logits; or logits_topk and logits_index) match their digests: every row when those arrays hold at most
   :data:`FULL_CHECK_BYTES` (1 GiB), else :data:`SAMPLE_ROWS` random rows plus the first and the last, drawn afresh
   at each open (``open(..., verify="full")`` forces all rows).

Each process also re-checks the header and size of params.npy and the output arrays before it maps them
(:meth:`TeacherCache.arrays`), so a file cut short after open() is named instead of failing inside numpy's mmap.

Cost: steps 1-4 are a few stat() calls and small reads (about 2 ms). Step 5 reads and hashes params and embeds once,
blake2b on one core at about 0.6 GB/s: for N=6000, K=10, D=1024, P=16 (123 MB of embeddings, 4 MB of params) a full
check took 0.22 s with the files in the page cache and 0.23 s after dropping them from it (posix_fadvise DONTNEED), a
sampled one (4,098 of the 6,000 rows) 0.15 s; one AMD EPYC core, median of 5 / 3 runs. A cold read from a slow disk
adds the time to read those bytes. Above 1 GiB (e.g. ImageNet-1k at K=10, D=1024: 26 GB) open() samples, so that a
run does not start by reading the whole cache; a sample of 4,098 rows of 20 KB reads about 84 MB.
:meth:`TeacherCache.build` digests each row as it writes it (0.24 s for the cache above, so a resumed build is covered
too), recomputes on resume any written row whose digest no longer matches, and verifies every row (never a sample)
before it marks a cache complete.

Disk space. Before creating any array file a build compares the bytes it needs with ``shutil.disk_usage`` and refuses
with both numbers; it then allocates every array with real blocks (``os.posix_fallocate``, else by writing zeros), so
that a full disk is an :class:`~pand.errors.OutputError` naming the file at allocation time, never a SIGBUS when a
memory-mapped page is written later. (Copy-on-write file systems such as ZFS or btrfs with compression can still need
new blocks on overwrite; keep caches on ext4/xfs-like file systems.)
"""

from __future__ import annotations

import errno
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

# Every array file a cache of any kind can hold (what a rebuild removes).
ARRAYS = ("params", "embeds", "logits", "logits_topk", "logits_index", "done", "digests")
DIGEST_SIZE = 16  # bytes of blake2b per row and array
FULL_CHECK_BYTES = 1 << 30  # open() verifies every row up to this many bytes of params + outputs, else a sample
SAMPLE_ROWS = 4096
# Room for the text.safetensors header, meta.json and its temporary copy, beyond the exact array sizes.
SLACK_BYTES = 1 << 20
_ZERO_CHUNK = 8 << 20
_NO_FALLOCATE = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


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


def output_arrays(embed_dim: int | None = None, *, num_classes: int | None = None,
                  topk: int | None = None) -> dict[str, tuple[int, np.dtype]]:
    """The per-view arrays holding the teacher's outputs, in digest-column order: name -> (row width, dtype).

    Image embeddings (``embed_dim``): embeds. Logits (``num_classes``): logits, all of them; or with ``topk`` the k
    largest and the floor of the rest (logits_topk, k + 1 values) and their class indices (logits_index).
    """
    if embed_dim is not None:
        return {"embeds": (int(embed_dim), np.dtype(np.float16))}
    if num_classes is None:
        raise ValueError("a teacher cache stores image embeddings (embed_dim) or logits (num_classes)")
    if not topk:
        return {"logits": (int(num_classes), np.dtype(np.float16))}
    return {"logits_topk": (int(topk) + 1, np.dtype(np.float16)), "logits_index": (int(topk), index_dtype(num_classes))}


def array_layout(num_samples: int, views: int, num_params: int, embed_dim: int | None = None, *,
                 num_classes: int | None = None, topk: int | None = None) -> dict[str, dict[str, Any]]:
    """Shape and dtype (as .npy descr) of every array of a cache, as stored in meta.json's "arrays".

    digests.npy has one column for params and one per output array (see :func:`output_arrays`).
    """
    outputs = output_arrays(embed_dim, num_classes=num_classes, topk=topk)
    shapes = {"params": ([num_samples, views, num_params], np.float32),
              **{name: ([num_samples, views, width], dtype) for name, (width, dtype) in outputs.items()},
              "done": ([num_samples], np.bool_),
              "digests": ([num_samples, 1 + len(outputs), DIGEST_SIZE], np.uint8)}
    return {name: {"shape": [int(s) for s in shape], "dtype": np.lib.format.dtype_to_descr(np.dtype(dtype))}
            for name, (shape, dtype) in shapes.items()}


def stored_outputs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`output_arrays` a cache's meta.json describes (KeyError if one is missing).

    A meta without "outputs" holds image embeddings (the only kind before format version 3).
    """
    if "logits" in (meta.get("outputs") or ["image_embeds"]):
        topk = meta["logits_topk"]
        return {"num_classes": int(meta["num_classes"]), "topk": None if topk is None else int(topk)}
    return {"embed_dim": int(meta["embed_dim"])}


def output_names(meta: Mapping[str, Any]) -> list[str]:
    """The output arrays' names, from the fewest meta entries (a cache made without "arrays" still names them)."""
    if "logits" in (meta.get("outputs") or ["image_embeds"]):
        return ["logits"] if meta.get("logits_topk") is None else ["logits_topk", "logits_index"]
    return ["embeds"]


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


def meta_layout(folder: Path, meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The array layout meta.json promises, checked against its own num_samples, views and output sizes."""
    try:
        arrays = meta["arrays"]
        n, k = int(meta["num_samples"]), int(meta["views"])
        sizes = stored_outputs(meta)
        p = int(arrays["params"]["shape"][2])
        want = array_layout(n, k, p, **sizes)
    except KeyError as err:
        raise CacheDamagedError(folder, f"meta.json has no entry {err}") from None
    except (TypeError, ValueError, IndexError) as err:
        raise CacheDamagedError(folder, f"meta.json has a garbled num_samples, views, outputs, their sizes or arrays "
                                        f"({err})") from None
    if arrays != want:
        said = ", ".join(f"{key}={value}" for key, value in sizes.items())
        raise CacheDamagedError(folder, f"meta.json's arrays {arrays} disagree with its num_samples={n}, views={k}, "
                                        f"{said} (expected {want})")
    return want


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
    path = folder / f"{name}.npy"
    if not path.is_file():
        raise CacheDamagedError(folder, f"{path.name} is missing")
    try:
        shape, dtype, fortran, offset = _read_npy_header(path)
    except (ValueError, EOFError, SyntaxError, TypeError, UnicodeDecodeError) as err:
        raise CacheDamagedError(folder, f"{path.name} has no readable .npy header ({err})") from None
    want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype != want_dtype or shape != want_shape or fortran:
        order = " in Fortran order" if fortran else ""
        raise CacheDamagedError(folder, f"{path.name} holds {dtype.name} {list(shape)}{order}, meta.json expects "
                                        f"{want_dtype.name} {list(want_shape)}")
    expected = offset + data_bytes(spec)
    size = path.stat().st_size
    if size < expected:
        raise CacheDamagedError(folder, f"{path.name} is {_bytes(size)}, expected {expected:,}: truncated")
    if size > expected:
        raise CacheDamagedError(folder, f"{path.name} is {_bytes(size)}, expected {expected:,}: longer than "
                                        "its header says")


def _check_text(folder: Path, meta: Mapping[str, Any]) -> None:
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


def _sample_rows(n: int, total_bytes: int, mode: str, size: int | None = None) -> np.ndarray:
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


def verify_cache(folder: str | os.PathLike, meta: Mapping[str, Any], verify: str = "auto", rows: bool = True) -> int:
    """Raise :class:`CacheDamagedError` naming the first damaged file of a cache (see the module docstring).

    ``rows=False`` stops after the structural checks (1-3), which is what an unfinished build can be held to.
    Returns the number of rows whose digests were checked.
    """
    folder = Path(folder)
    layout = meta_layout(folder, meta)
    for name, spec in layout.items():
        check_array(folder, name, spec)
    if "embeds" in layout:
        _check_text(folder, meta)
    if not rows:
        return 0
    done = np.load(folder / "done.npy")
    if not done.all():
        missing = np.flatnonzero(~done)
        raise CacheDamagedError(folder, f"done.npy marks {len(missing)} of {len(done)} rows unwritten (first: row "
                                        f"{int(missing[0])}) although meta.json says the cache is complete")
    stored = (meta.get("checksums") or {}).get("digests.npy")
    if stored != file_digest(folder / "digests.npy"):
        reason = ("digests.npy does not match its checksum in meta.json (same size, altered content)" if stored
                  else "meta.json has no checksum of digests.npy")
        raise CacheDamagedError(folder, reason)
    digests = np.load(folder / "digests.npy")
    columns = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in layout
               if name not in ("done", "digests")}
    checked = _sample_rows(len(done), sum(a.nbytes for a in columns.values()), verify)
    for name, bad in bad_rows(columns, digests, checked).items():
        if bad:
            raise CacheDamagedError(folder, f"{name} row {bad[0]} does not match its checksum in digests.npy "
                                            f"({len(bad)} of {len(checked)} rows checked differ): the file was altered "
                                            "in place (same size, other content)")
    return len(checked)


# -- allocation ----------------------------------------------------------------------------------------------------
def _fill_zeros(fd: int, offset: int, nbytes: int) -> None:
    """Give ``nbytes`` from ``offset`` real blocks by writing zeros (where posix_fallocate is unavailable)."""
    zeros = memoryview(bytes(min(nbytes, _ZERO_CHUNK)))
    os.lseek(fd, offset, os.SEEK_SET)
    left = nbytes
    while left:
        left -= os.write(fd, zeros[: min(left, len(zeros))])
    os.fsync(fd)  # network file systems may report a full disk only here


def _reserve(fd: int, offset: int, nbytes: int) -> None:
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, offset, nbytes)
            return
        except OSError as err:
            if err.errno not in _NO_FALLOCATE:
                raise
    _fill_zeros(fd, offset, nbytes)


def allocation_error(path: Path, nbytes: int, err: OSError) -> OutputError:
    reason = OUTPUT_ERRNOS.get(err.errno, err.strerror or str(err))
    return OutputError(f"cannot allocate {path} ({nbytes:,} bytes) for the teacher cache: {reason}. Free space there "
                       "or set cache.dir to a folder on a disk with room for the cache")


def allocate_npy(path: str | os.PathLike, spec: Mapping[str, Any]) -> None:
    """Create ``path`` as a .npy file of ``spec``'s shape and dtype whose data has real blocks on disk (not sparse).

    A memory map of a sparse file dies by SIGBUS when a page is first written on a full disk; allocating up front
    turns that into an :class:`~pand.errors.OutputError` naming the file, here.
    """
    path = Path(path)
    header, nbytes = npy_header(spec), data_bytes(spec)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, header)
            if nbytes:
                _reserve(fd, len(header), nbytes)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in OUTPUT_ERRNOS:
            raise allocation_error(path, len(header) + nbytes, err) from err
        raise


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


def remove_cache_files(folder: Path) -> None:
    for name in (*(f"{a}.npy" for a in ARRAYS), "text.safetensors", "meta.json"):
        (folder / name).unlink(missing_ok=True)
