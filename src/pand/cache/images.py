"""A decoded-image cache: every image decoded and short-side resized ONCE, then read from a memory-mapped file.

Decoding JPEGs every epoch dominates a CPU data loader. Both the training augmentation
(:class:`~pand.data.transforms.ReplayableAugment`) and :func:`~pand.data.transforms.eval_transform` start with
``resize_short(uint8 image, resize_size)``, which returns its input unchanged when the short side already has that
size. Storing the output of exactly that function (in the same channels-last memory layout the PIL path produces)
therefore makes ``augment.apply(cache.image(i), p)`` bit-identical to ``augment.apply(dataset.load_image(i), p)``,
and ``augment.sample(g, hw)`` draws the same params for the original and the pre-resized size (both resize to the
same ``(H', W')``). The same holds for ``eval_transform(image_size, resize_size)`` with the same ``resize_size``.

Folder layout::

    pixels.u8   all images back to back, each as uint8 H x W x C (channels last), written append-only in chunks
    index.npy   int64 [N, 4]: byte offset, C, H, W of every image (rewritten atomically after every chunk)
    chunks.npy  one record per chunk: the index of its last image + 1, and blake2b-128 digests of its index.npy rows
                and of its pixels.u8 bytes (rewritten atomically after every chunk, before index.npy)
    meta.json   provenance + ``complete``; written atomically, ``complete: true`` only after everything else

A build writes ``meta.json`` with ``complete: false`` first, then appends chunks to ``pixels.u8``; after each chunk
the pixels are fsynced, their digests recorded in ``chunks.npy``, and ``index.npy`` (the rows done so far) is
replaced atomically. A killed build is therefore never read as complete; :meth:`DecodedImageCache.build` resumes it
after the last recorded chunk whose digests still match, truncating ``pixels.u8`` there.

Integrity. A cache is a copy of the dataset that training trusts instead of the images, so it is checked the way the
teacher cache is (:mod:`pand.cache.integrity`, whose digest and sampling functions this module uses) before it is
used: :meth:`DecodedImageCache.open` checks that ``pixels.u8`` has exactly the bytes the index accounts for, that the
index is self-consistent (consecutive offsets, 3 channels, short side ``resize_size``) and that ``chunks.npy`` covers
it, then recomputes the digests of every chunk while the pixels hold at most
:data:`~pand.cache.integrity.FULL_CHECK_BYTES` (1 GiB), else of the first, the last and random chunks adding up to
about :data:`SAMPLE_BYTES`, drawn afresh at each open (``verify="full"`` checks all). A build verifies every chunk
before it marks the cache complete, and a resumed build every chunk it keeps. A damaged cache (altered in place,
truncated, a garbled index) is rebuilt by :meth:`~DecodedImageCache.build` / :meth:`~DecodedImageCache.ensure` with
one warning naming the folder, the chunk and the reason; :meth:`~DecodedImageCache.open` alone raises
:class:`DecodedCacheDamagedError`. Each process also checks the size of ``pixels.u8`` when it maps the file.

Cost: the checks before the digests are a few stat() calls and vectorised checks of the index. The digests read and
hash the pixels once, blake2b on one core at about 0.6 GB/s: 5,000 images of 64 x 64 (61 MB) took 0.10 s with the
file in the page cache and 0.13 s after dropping it from it (posix_fadvise DONTNEED), one AMD EPYC core, median of
5 / 3 runs. A cold read from a slow disk adds the time to read those bytes. Above 1 GiB (ImageNet-1k's training split
at 256 px: about 300 GB) open() samples instead, reading about 128 MiB plus the first and the last chunk. A build
spends about as long again on digesting the chunks it writes and on verifying them before it marks the cache
complete: small next to decoding the images.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from pand.cache.integrity import DIGEST_SIZE, row_digest, sample_rows
from pand.data.base import ClassificationDataset
from pand.data.image_ops import resize_short, to_uint8_chw
from pand.data.transforms import TRANSFORM_VERSION
from pand.errors import MismatchError, PandError
from pand.io import atomic_write_bytes, atomic_write_json, mark_output_folder
from pand.locks import FolderLock
from pand.provenance import check_provenance, describe_mismatch

__all__ = ["DecodedImageCache", "CachedImageDataset", "DecodedCacheDamagedError", "with_decoded_cache"]

log = logging.getLogger(__name__)

KIND = "pand.decoded_images"
# 2: chunks.npy (digests). A version-1 cache has none, so it is stale and rebuilt rather than trusted unchecked.
FORMAT_VERSION = 2
#: Identifies the resize kernel the stored pixels come from; part of the provenance record.
# It still names the kernel's former home (now pand.data.image_ops.resize_short, the same kernel): changing the
# string would make every existing decoded cache look stale and be rebuilt for nothing.
RESIZE_FN = f"pand.data.transforms._resize_short(bilinear, antialias, uint8)@v{TRANSFORM_VERSION}"

PIXELS = "pixels.u8"
INDEX = "index.npy"
CHUNKS = "chunks.npy"
META = "meta.json"

#: One record of chunks.npy: images ``previous stop .. stop - 1``, the digest of their index.npy rows, of their pixels.
CHUNK_DTYPE = np.dtype([("stop", "<i8"), ("index", "u1", (DIGEST_SIZE,)), ("pixels", "u1", (DIGEST_SIZE,))])
#: A sampled check (caches above FULL_CHECK_BYTES) reads about this much: a chunk of 256 images at 256 px is ~50 MB.
SAMPLE_BYTES = 128 << 20

#: Keys that say WHICH data a cache holds: a difference means the folder belongs to something else.
IDENTITY_KEYS = ("kind", "name", "split", "resize_size")
#: Keys that say whether the stored pixels are still what this run would produce (data content, kernel, libraries).
CONTENT_KEYS = ("format_version", "fingerprint", "num_images", "resize_fn", "torch", "torchvision", "layout")
CHECKED_KEYS = IDENTITY_KEYS + CONTENT_KEYS

_HINT = (
    "Use a separate cache folder per dataset/split/resize_size, or delete the folder (or pass overwrite=True to "
    "DecodedImageCache.ensure / with_decoded_cache) to rebuild it."
)


def _expected_record(dataset: ClassificationDataset, resize_size: int) -> dict[str, Any]:
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "name": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_images": len(dataset),
        "resize_size": int(resize_size),
        "resize_fn": RESIZE_FN,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "layout": "HWC uint8",
    }


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PandError(f"{path} is not readable JSON ({err}); delete {folder} to rebuild the cache") from err


def _decode_resized(dataset: ClassificationDataset, i: int, resize_size: int) -> np.ndarray:
    """The i-th image after the augmentation's own short-side resize, as a contiguous uint8 [H, W, C] array."""
    x = resize_short(to_uint8_chw(dataset.load_image(i)), resize_size)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def _identity(x: Any) -> Any:
    return x


class _Decoder(Dataset):
    """Items ``start..n-1`` decoded and resized (used by a DataLoader to decode in worker processes)."""

    def __init__(self, dataset: ClassificationDataset, resize_size: int, start: int) -> None:
        self.dataset, self.resize_size, self.start = dataset, int(resize_size), int(start)

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, k: int) -> np.ndarray:
        return _decode_resized(self.dataset, self.start + k, self.resize_size)


def _iter_decoded(
    dataset: ClassificationDataset, resize_size: int, start: int, num_workers: int
) -> Iterator[np.ndarray]:
    if num_workers <= 0:
        for i in range(start, len(dataset)):
            yield _decode_resized(dataset, i, resize_size)
        return
    loader = DataLoader(
        _Decoder(dataset, resize_size, start),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        prefetch_factor=4,
    )
    yield from loader


class DecodedCacheDamagedError(PandError):
    """A decoded-image cache whose files no longer hold what was written (altered in place, truncated, garbled).

    ``folder`` and ``reason`` are kept as attributes. :meth:`DecodedImageCache.build` and
    :meth:`~DecodedImageCache.ensure` rebuild such a cache; the error reaches a user from
    :meth:`DecodedImageCache.open` called alone, or from a reader whose ``pixels.u8`` changed after it was opened.
    """

    def __init__(self, folder: str | os.PathLike, reason: str) -> None:
        self.folder = Path(folder)
        self.reason = reason
        super().__init__(f"the decoded-image cache at {self.folder} is damaged: {reason}. DecodedImageCache.ensure "
                         f"(and a run with data.decoded_cache) rebuilds it; or delete {self.folder}")


def _image_bytes(index: np.ndarray) -> np.ndarray:
    return index[:, 1] * index[:, 2] * index[:, 3]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(folder: Path, name: str) -> np.ndarray | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DecodedCacheDamagedError(folder, f"{name} cannot be read ({err})") from None


def _chunk_records(chunks: list[tuple[int, bytes, bytes]]) -> np.ndarray:
    records = np.zeros(len(chunks), dtype=CHUNK_DTYPE)
    for k, (stop, index_digest, pixels_digest) in enumerate(chunks):
        records[k] = (stop, np.frombuffer(index_digest, np.uint8), np.frombuffer(pixels_digest, np.uint8))
    return records


def _check_layout(folder: Path, index: np.ndarray, chunks: np.ndarray, resize_size: int) -> None:
    """index.npy and chunks.npy agree with each other and with how the build writes them (no pixel is read)."""
    if index.dtype != np.int64 or index.ndim != 2 or index.shape[1] != 4:
        raise DecodedCacheDamagedError(folder, f"{INDEX} holds {index.dtype} {list(index.shape)}, expected int64 "
                                               "[N, 4]")
    if chunks.dtype != CHUNK_DTYPE or chunks.ndim != 1:
        raise DecodedCacheDamagedError(folder, f"{CHUNKS} holds {chunks.dtype} {list(chunks.shape)}, expected "
                                               f"records {CHUNK_DTYPE.descr}")
    if len(index):
        sizes = _image_bytes(index)
        starts = np.cumsum(sizes) - sizes
        short = np.minimum(index[:, 2], index[:, 3])
        bad = np.flatnonzero((index[:, 1] != 3) | (short != resize_size) | (index[:, 0] != starts))
        if len(bad):
            i = int(bad[0])
            raise DecodedCacheDamagedError(folder, f"{INDEX} row {i} is {index[i].tolist()}, expected offset "
                                                   f"{int(starts[i])}, 3 channels and a short side of {resize_size}")
    stops = chunks["stop"]
    if (len(index) and (not len(stops) or stops[-1] != len(index))) or np.any(np.diff(stops) <= 0) \
            or (len(stops) and stops[0] <= 0) or (not len(index) and len(stops)):
        raise DecodedCacheDamagedError(folder, f"{CHUNKS} records chunks ending at images {stops.tolist()[:5]}"
                                               f"{' ...' if len(stops) > 5 else ''}, which do not cover the "
                                               f"{len(index)} images of {INDEX}")


def _chunk_damage(pixels: np.ndarray, index: np.ndarray, chunks: np.ndarray, m: int) -> str | None:
    """Why chunk ``m`` no longer matches its digests, or None."""
    lo = int(chunks["stop"][m - 1]) if m else 0
    hi = int(chunks["stop"][m])
    rows = index[lo:hi]
    first, last = int(rows[0, 0]), int(rows[-1, 0] + rows[-1, 1:].prod())
    where = f"chunk {m} (images {lo}..{hi - 1}, bytes {first:,}..{last - 1:,})"
    if row_digest(rows) != chunks["index"][m].tobytes():
        return f"the {INDEX} rows of {where} do not match their digest in {CHUNKS}: altered in place"
    if len(pixels) < last:
        return f"{PIXELS} is {len(pixels):,} bytes, {where} ends at byte {last:,}: truncated"
    if row_digest(pixels[first:last]) != chunks["pixels"][m].tobytes():
        return (f"{PIXELS} {where} does not match its digest in {CHUNKS}: the file was altered in place (same "
                "size, other content)")
    return None


def _map_pixels(folder: Path) -> np.ndarray:
    path = folder / PIXELS
    if not path.is_file() or path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _verify(folder: Path, meta: dict[str, Any], resize_size: int, verify: str) -> np.ndarray:
    """The index of a complete cache, after the checks of the module docstring; DecodedCacheDamagedError if any
    fails."""
    n = int(meta["num_images"])
    index, chunks = _load_npy(folder, INDEX), _load_npy(folder, CHUNKS)
    for name, array in ((INDEX, index), (CHUNKS, chunks)):
        if array is None:
            raise DecodedCacheDamagedError(folder, f"{name} is missing")
    if len(index) != n:
        raise DecodedCacheDamagedError(folder, f"{INDEX} has {len(index)} rows, expected {n} (num_images)")
    _check_layout(folder, index, chunks, resize_size)
    end = int(_image_bytes(index).sum())
    if meta.get("total_bytes") != end:
        raise DecodedCacheDamagedError(folder, f"meta.json says total_bytes={meta.get('total_bytes')}, {INDEX} "
                                               f"accounts for {end:,} bytes")
    path = folder / PIXELS
    if not path.is_file():
        raise DecodedCacheDamagedError(folder, f"{PIXELS} is missing")
    size = path.stat().st_size
    if size != end:
        state = "truncated" if size < end else "longer than its index says"
        raise DecodedCacheDamagedError(folder, f"{PIXELS} is {size:,} bytes, expected {end:,}: {state}")
    if len(chunks):
        per_chunk = max(1, end // len(chunks))
        picked = sample_rows(len(chunks), end, verify, size=max(1, SAMPLE_BYTES // per_chunk))
        pixels = _map_pixels(folder)
        for m in picked:
            reason = _chunk_damage(pixels, index, chunks, int(m))
            if reason:
                raise DecodedCacheDamagedError(folder, reason)
    return index


class DecodedImageCache:
    """uint8 images resized to a short side of ``resize_size``, stored once in a folder (see the module docstring).

    Readers open ``pixels.u8`` lazily with ``numpy.memmap`` (read-only) in each process; the memmap is never pickled,
    so a cache (or a :class:`CachedImageDataset`) can be sent to DataLoader worker processes.
    """

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any], index: np.ndarray) -> None:
        self.folder = Path(folder)
        self.meta = dict(meta)
        self.resize_size = int(meta["resize_size"])
        self.index = np.asarray(index, dtype=np.int64)
        self._mm: np.memmap | None = None

    # -- reading ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def _pixels(self) -> np.memmap:
        if self._mm is None:
            # Every process maps the file itself: one cut short since open() must be named, not fail in reshape.
            path = self.folder / PIXELS
            end = int(_image_bytes(self.index).sum())
            size = path.stat().st_size if path.is_file() else -1
            if size != end:
                state = "missing" if size < 0 else f"{size:,} bytes, expected {end:,}"
                raise DecodedCacheDamagedError(self.folder, f"{PIXELS} is {state}: it changed after the cache was "
                                                            "opened")
            self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        return self._mm

    def image(self, i: int) -> torch.Tensor:
        """The i-th image as uint8 ``[3, H, W]`` (a channels-last view of a fresh copy, like the PIL path gives)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a decoded-image cache of {n} images in {self.folder}")
        off, c, h, w = (int(v) for v in self.index[i])
        arr = np.array(self._pixels()[off : off + h * w * c]).reshape(h, w, c)  # copy: safe to collate / modify
        return torch.from_numpy(arr).permute(2, 0, 1)

    def image_hw(self, i: int) -> tuple[int, int]:
        """``(H, W)`` of the stored (resized) i-th image, without reading it."""
        return int(self.index[i, 2]), int(self.index[i, 3])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None  # re-opened lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.folder)!r}, {self.meta.get('name')}/{self.meta.get('split')}, "
            f"n={len(self)}, resize_size={self.resize_size})"
        )

    # -- opening ---------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, dataset: ClassificationDataset, resize_size: int,
             verify: str = "auto") -> DecodedImageCache:
        """Open a complete, undamaged cache of ``dataset`` at ``resize_size``.

        ``verify`` picks which chunks are checked against their digests: "auto" (all up to 1 GiB of pixels, else a
        sample), "full" or "sample".

        Raises:
            PandError: there is no cache in ``folder``, or its build did not finish.
            MismatchError: the cache was made for other data, another resize size, kernel or library version
                (the message lists every difference).
            DecodedCacheDamagedError: a file of the cache is missing, truncated or altered (the message names it,
                and the chunk).
        """
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise PandError(
                f"no decoded-image cache in {folder} (missing {META}); build it with DecodedImageCache.build/ensure"
            )
        expected = _expected_record(dataset, resize_size)
        check_provenance(folder / META, meta, expected, keys=CHECKED_KEYS, hint=_HINT)
        if meta.get("complete") is not True:
            raise PandError(
                f"the decoded-image cache in {folder} is incomplete (its build was interrupted); "
                "DecodedImageCache.ensure / build resumes it"
            )
        return cls(folder, meta, _verify(folder, meta, int(resize_size), verify))

    @staticmethod
    def _resumable(folder: Path, resize_size: int) -> tuple[np.ndarray, list[tuple[int, bytes, bytes]]]:
        """The index rows and chunk records an interrupted build keeps: every recorded chunk up to the first one
        that no longer matches its digests (a warning names it)."""
        empty: tuple[np.ndarray, list] = (np.zeros((0, 4), dtype=np.int64), [])
        try:
            index, chunks = _load_npy(folder, INDEX), _load_npy(folder, CHUNKS)
            if index is None or chunks is None:
                return empty
            if chunks.dtype == CHUNK_DTYPE and chunks.ndim == 1 and index.ndim == 2:
                # chunks.npy is written before index.npy: a kill between the two leaves one chunk more than indexed
                chunks = chunks[chunks["stop"] <= len(index)]
                index = index[: int(chunks["stop"][-1]) if len(chunks) else 0]
            _check_layout(folder, index, chunks, resize_size)
        except DecodedCacheDamagedError as err:
            log.warning("decoded-image cache %s is damaged (%s); decoding every image again", folder, err.reason)
            return empty
        pixels = _map_pixels(folder)
        keep = len(chunks)
        for m in range(len(chunks)):
            reason = _chunk_damage(pixels, index, chunks, m)
            if reason:
                restart = int(chunks["stop"][m - 1]) if m else 0
                log.warning("decoded-image cache %s is damaged (%s); decoding again from image %d", folder, reason,
                            restart)
                keep = m
                break
        del pixels
        kept = [(int(r["stop"]), r["index"].tobytes(), r["pixels"].tobytes()) for r in chunks[:keep]]
        return index[: kept[-1][0] if kept else 0], kept

    # -- building --------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        dataset: ClassificationDataset,
        folder: str | os.PathLike,
        resize_size: int,
        *,
        num_workers: int = 0,
        progress: bool = True,
        chunk_size: int = 256,
        overwrite: bool = False,
    ) -> DecodedImageCache:
        """Decode + resize every image of ``dataset`` into ``folder``; resumes an interrupted build of the same data.

        An existing folder for the same data whose content is stale (other fingerprint, kernel or library version)
        or damaged (:class:`DecodedCacheDamagedError`) is rebuilt from scratch; one for other data (kind, name, split
        or resize_size differ) is refused with MismatchError unless ``overwrite``. ``chunk_size`` images are appended
        between progress records, and each such chunk gets its digests.

        One build writes a folder at a time (:class:`~pand.locks.FolderLock`): a second one, from another run or
        another process of the same run, waits and then finds the cache complete instead of appending under it.
        """
        with FolderLock(folder, "decoded-image cache").acquire(wait=True):
            return cls._build(dataset, folder, resize_size, num_workers=num_workers, progress=progress,
                              chunk_size=chunk_size, overwrite=overwrite)

    @classmethod
    def _build(cls, dataset: ClassificationDataset, folder: str | os.PathLike, resize_size: int, *, num_workers: int,
               progress: bool, chunk_size: int, overwrite: bool) -> DecodedImageCache:
        folder = Path(folder)
        resize_size = int(resize_size)
        if resize_size < 1:
            raise ValueError(f"resize_size must be a positive int, got {resize_size}")
        expected = _expected_record(dataset, resize_size)
        meta = _read_meta(folder)
        index = np.zeros((0, 4), dtype=np.int64)
        chunks: list[tuple[int, bytes, bytes]] = []
        if meta is not None:
            if not overwrite:
                check_provenance(folder / META, meta, expected, keys=IDENTITY_KEYS, hint=_HINT)
            stale = describe_mismatch(meta, expected, CHECKED_KEYS)
            if stale:
                log.warning("decoded-image cache %s is stale (%s); rebuilding it", folder, "; ".join(stale))
                cls._clear(folder)
            elif meta.get("complete") is True:
                try:
                    return cls.open(folder, dataset, resize_size)
                except DecodedCacheDamagedError as err:
                    log.warning("decoded-image cache %s is damaged (%s); rebuilding it", folder, err.reason)
                    cls._clear(folder)
            else:
                index, chunks = cls._resumable(folder, resize_size)
        start = len(index)
        folder.mkdir(parents=True, exist_ok=True)
        mark_output_folder(folder, "decoded-images")
        if start == 0:
            for name in (PIXELS, INDEX, CHUNKS):
                (folder / name).unlink(missing_ok=True)
        atomic_write_json(folder / META, {**expected, "complete": False})

        rows = [tuple(int(v) for v in r) for r in index]
        end = int(_image_bytes(index).sum())
        n = len(dataset)
        if start:
            log.info("resuming decoded-image cache %s at image %d/%d", folder, start, n)

        bar = _progress_bar(progress, f"decoding {dataset.name}/{dataset.split} -> {folder.name}", n, start)
        try:
            with open(folder / PIXELS, "ab+") as f:
                f.truncate(end)  # drop bytes of a chunk whose index never got recorded
                f.seek(end)
                pending = 0
                for arr in _iter_decoded(dataset, resize_size, start, num_workers):
                    h, w, c = arr.shape
                    f.write(arr.tobytes())
                    rows.append((end, c, h, w))
                    end += arr.nbytes
                    pending += 1
                    if bar is not None:
                        bar.update(1)
                    if pending >= chunk_size:
                        cls._commit_chunk(folder, f, rows, chunks)
                        pending = 0
                cls._commit_chunk(folder, f, rows, chunks)
        finally:
            if bar is not None:
                bar.close()
        if len(rows) != n:
            raise PandError(f"decoded {len(rows)} images but {dataset.name}/{dataset.split} has {n}")
        meta = {**expected, "complete": True, "total_bytes": end}
        try:
            index = _verify(folder, meta, resize_size, "full")
        except DecodedCacheDamagedError as err:
            raise DecodedCacheDamagedError(folder, f"{err.reason} (found when verifying the cache just built, which "
                                                   "is left incomplete; is the disk failing?)") from None
        atomic_write_json(folder / META, meta)
        return cls(folder, meta, index)

    @staticmethod
    def _commit_chunk(folder: Path, f, rows: list[tuple[int, int, int, int]],
                      chunks: list[tuple[int, bytes, bytes]]) -> None:
        """Make the appended pixels durable, record their digests, then record them in index.npy (atomically)."""
        f.flush()
        os.fsync(f.fileno())
        index = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        lo = chunks[-1][0] if chunks else 0
        if len(index) > lo:
            # digests of the bytes as the file holds them, which is what a later check reads
            pixels = _map_pixels(folder)
            first, last = int(index[lo, 0]), int(index[-1, 0] + index[-1, 1:].prod())
            chunks.append((len(index), row_digest(index[lo:]), row_digest(pixels[first:last])))
            del pixels
        atomic_write_bytes(folder / CHUNKS, _npy_bytes(_chunk_records(chunks)))
        atomic_write_bytes(folder / INDEX, _npy_bytes(index))

    @staticmethod
    def _clear(folder: Path) -> None:
        (folder / META).unlink(missing_ok=True)  # first: a half-cleared folder is never read as complete
        for name in (PIXELS, INDEX, CHUNKS):
            (folder / name).unlink(missing_ok=True)

    @classmethod
    def ensure(
        cls, dataset: ClassificationDataset, folder: str | os.PathLike, resize_size: int, **kw: Any
    ) -> DecodedImageCache:
        """Open the cache if it is complete and valid; otherwise build it: resume an interrupted build, rebuild a
        stale or damaged one (one warning says why), refuse one made for other data (see :meth:`build`)."""
        return cls.build(dataset, folder, resize_size, **kw)


class _Bar:
    def __init__(self, description: str, total: int, completed: int) -> None:
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.start()
        self._task = self._p.add_task(description, total=total, completed=completed)

    def update(self, k: int) -> None:
        self._p.advance(self._task, k)

    def close(self) -> None:
        self._p.stop()


def _progress_bar(enabled: bool, description: str, total: int, completed: int) -> _Bar | None:
    if not enabled or total - completed <= 0:
        return None
    try:
        return _Bar(description, total, completed)
    except Exception:  # noqa: BLE001 - a progress bar is never worth failing a build
        return None


class CachedImageDataset(ClassificationDataset):
    """``dataset`` with images read from a :class:`DecodedImageCache`.

    Same name, split, classes, targets, transform, root, fingerprint and sample ids as ``dataset``, but
    :meth:`load_image` returns the cached uint8 ``[3, H', W']`` tensor (short side already ``resize_size``) instead
    of a PIL image. :class:`~pand.data.transforms.ReplayableAugment` and
    :func:`~pand.data.transforms.eval_transform` (with the same ``resize_size``) accept it and give bit-identical
    outputs; transforms that need a PIL image do not.
    """

    def __init__(self, dataset: ClassificationDataset, cache: DecodedImageCache) -> None:
        if len(cache) != len(dataset):
            raise MismatchError(f"cache {cache.folder} holds {len(cache)} images but the dataset has {len(dataset)}")
        super().__init__(dataset.name, dataset.split, dataset.classes, dataset.targets, dataset.transform, dataset.root)
        self.dataset = dataset
        self.cache = cache
        self.resize_size = cache.resize_size
        self._fingerprint = dataset.fingerprint()

    def load_image(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.cache.image(self._check_index(i))

    def sample_id(self, i: int) -> str:
        return self.dataset.sample_id(i)

    def _hash_items(self, h: Any, indices) -> None:
        self.dataset._hash_items(h, indices)


def with_decoded_cache(
    dataset: ClassificationDataset, folder: str | os.PathLike, resize_size: int, **kw: Any
) -> CachedImageDataset:
    """``dataset`` reading its images from the decoded-image cache in ``folder`` (built or resumed if needed)."""
    return CachedImageDataset(dataset, DecodedImageCache.ensure(dataset, folder, resize_size, **kw))

