"""A decoded-image cache: every image decoded and short-side resized ONCE, then read from a memory-mapped file.

Decoding JPEGs every epoch dominates a CPU data loader. Both the training augmentation
(:class:`~pand.data.transforms.ReplayableAugment`) and :func:`~pand.data.transforms.eval_transform` start with
``_resize_short(uint8 image, resize_size)``, which returns its input unchanged when the short side already has that
size. Storing the output of exactly that function (in the same channels-last memory layout the PIL path produces)
therefore makes ``augment.apply(cache.image(i), p)`` bit-identical to ``augment.apply(dataset.load_image(i), p)``,
and ``augment.sample(g, hw)`` draws the same params for the original and the pre-resized size (both resize to the
same ``(H', W')``). The same holds for ``eval_transform(image_size, resize_size)`` with the same ``resize_size``.

Folder layout::

    pixels.u8   all images back to back, each as uint8 H x W x C (channels last), written append-only in chunks
    index.npy   int64 [N, 4]: byte offset, C, H, W of every image (rewritten atomically after every chunk)
    meta.json   provenance + ``complete``; written atomically, ``complete: true`` only after everything else

A build writes ``meta.json`` with ``complete: false`` first, then appends chunks to ``pixels.u8``; after each chunk
the pixels are fsynced and ``index.npy`` (the rows done so far) is replaced atomically. A killed build is therefore
never read as complete; :meth:`DecodedImageCache.build` resumes it by truncating ``pixels.u8`` to the end of the last
indexed image and continuing from there.
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

from pand.data.base import ClassificationDataset
from pand.data.transforms import TRANSFORM_VERSION, _resize_short, _to_uint8_chw
from pand.errors import MismatchError, PandError
from pand.io import atomic_write_bytes, atomic_write_json
from pand.provenance import check_provenance, describe_mismatch

__all__ = ["DecodedImageCache", "CachedImageDataset", "with_decoded_cache"]

log = logging.getLogger(__name__)

KIND = "pand.decoded_images"
FORMAT_VERSION = 1
#: Identifies the resize kernel the stored pixels come from; part of the provenance record.
RESIZE_FN = f"pand.data.transforms._resize_short(bilinear, antialias, uint8)@v{TRANSFORM_VERSION}"

PIXELS = "pixels.u8"
INDEX = "index.npy"
META = "meta.json"

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
    x = _resize_short(_to_uint8_chw(dataset.load_image(i)), resize_size)
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
            self._mm = np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r")
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
    def open(cls, folder: str | os.PathLike, dataset: ClassificationDataset, resize_size: int) -> DecodedImageCache:
        """Open a complete cache of ``dataset`` at ``resize_size``.

        Raises:
            PandError: there is no cache in ``folder``, or its build did not finish.
            MismatchError: the cache was made for other data, another resize size, kernel or library version
                (the message lists every difference).
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
        index = cls._load_index(folder)
        n = int(meta["num_images"])
        if index.shape != (n, 4):
            raise PandError(f"{folder / INDEX} has shape {index.shape}, expected ({n}, 4); delete {folder} to rebuild")
        end = int(index[-1, 0] + index[-1, 1:].prod()) if n else 0
        size = (folder / PIXELS).stat().st_size if (folder / PIXELS).exists() else -1
        if size != end or end != meta.get("total_bytes", end):
            raise PandError(f"{folder / PIXELS} has {size} bytes, expected {end}; delete {folder} to rebuild")
        return cls(folder, meta, index)

    @staticmethod
    def _load_index(folder: Path) -> np.ndarray:
        path = folder / INDEX
        if not path.is_file():
            return np.zeros((0, 4), dtype=np.int64)
        return np.load(path, allow_pickle=False)

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
        is rebuilt from scratch; one for other data (kind, name, split or resize_size differ) is refused with
        MismatchError unless ``overwrite``. ``chunk_size`` images are appended between progress records.
        """
        folder = Path(folder)
        resize_size = int(resize_size)
        if resize_size < 1:
            raise ValueError(f"resize_size must be a positive int, got {resize_size}")
        expected = _expected_record(dataset, resize_size)
        meta = _read_meta(folder)
        start = 0
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
                except PandError as err:  # damaged files: rebuild
                    log.warning("decoded-image cache %s is damaged (%s); rebuilding it", folder, err)
                    cls._clear(folder)
            else:
                start = len(cls._load_index(folder))
        folder.mkdir(parents=True, exist_ok=True)
        if start == 0:
            for name in (PIXELS, INDEX):
                (folder / name).unlink(missing_ok=True)
        atomic_write_json(folder / META, {**expected, "complete": False})

        index = cls._load_index(folder)[:start]
        rows = [tuple(int(v) for v in r) for r in index]
        end = int(index[-1, 0] + index[-1, 1:].prod()) if start else 0
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
                        cls._commit_chunk(folder, f, rows)
                        pending = 0
                cls._commit_chunk(folder, f, rows)
        finally:
            if bar is not None:
                bar.close()
        if len(rows) != n:
            raise PandError(f"decoded {len(rows)} images but {dataset.name}/{dataset.split} has {n}")
        atomic_write_json(folder / META, {**expected, "complete": True, "total_bytes": end})
        return cls.open(folder, dataset, resize_size)

    @staticmethod
    def _commit_chunk(folder: Path, f, rows: list[tuple[int, int, int, int]]) -> None:
        """Make the appended pixels durable, then record them in index.npy (atomically)."""
        f.flush()
        os.fsync(f.fileno())
        buf = io.BytesIO()
        np.save(buf, np.asarray(rows, dtype=np.int64).reshape(-1, 4), allow_pickle=False)
        atomic_write_bytes(folder / INDEX, buf.getvalue())

    @staticmethod
    def _clear(folder: Path) -> None:
        (folder / META).unlink(missing_ok=True)  # first: a half-cleared folder is never read as complete
        for name in (PIXELS, INDEX):
            (folder / name).unlink(missing_ok=True)

    @classmethod
    def ensure(
        cls, dataset: ClassificationDataset, folder: str | os.PathLike, resize_size: int, **kw: Any
    ) -> DecodedImageCache:
        """Open the cache if it is complete and valid; otherwise build it (resuming an interrupted build)."""
        meta = _read_meta(Path(folder))
        if meta is not None and meta.get("complete") is True and not kw.get("overwrite"):
            try:
                return cls.open(folder, dataset, resize_size)
            except MismatchError:
                pass  # build() refuses other data and rebuilds stale content
            except PandError as err:
                log.warning("decoded-image cache %s is damaged (%s); rebuilding it", folder, err)
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

