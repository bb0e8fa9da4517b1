"""The same image in two splits, found by content: a test image that is also trained on inflates the test score
however it got there (a copy, a link, a folder given as unlabelled images that holds the test folder).

Every item gets a content digest: the sha256 of its file's bytes (for a sample of tar shards, of its image member's
bytes, so that a shard's image and the same image as a file match), or for an in-memory array dataset (Fashion-MNIST,
CIFAR-100) the sha256 of its pixel bytes. :func:`check_overlap` compares the splits of a run pairwise:

* ``train``-``val``, ``train``-``test``, ``val``-``test``, ``unlabelled``-``val`` and ``unlabelled``-``test`` (and
  ``test_novel`` wherever ``test`` is named). Unlabelled and labelled training images may be the same: both are
  trained on.
* A shared image is an **error** when the two splits come from different sources and at least one of them is the
  user's own: an image-folder dataset's split folders (``data=imagefolder``), tar shards (``data=shards``) or
  ``data.unlabelled`` images. The message names the first few pairs of files and the count;
  ``data.allow_overlap=true`` turns it into a warning.
* A shared image between two official splits of a published dataset (CUB, Aircraft, Pets, Dogs, ImageNet,
  Fashion-MNIST, CIFAR-100), or between two parts of one source (``val`` carved from the training folder,
  ``data.unlabelled=rest``), is logged with its count, not refused: official splits are known to hold a few exact
  duplicates (the first Fashion-MNIST release had 10 training images repeated in its test set), and refusing them
  would refuse the published protocol that results are compared on.
* A file and an array item are never compared (their bytes are of different kinds): a folder of unlabelled files
  next to Fashion-MNIST or CIFAR-100 is not checked against their test images.

:func:`check_overlap` returns ``{"<split>/<split>": count}`` for every pair compared: the number of items of the first
split whose content is also in the second. The data module keeps it (``PandDataModule.overlap``) for the run summary.

Reading every file costs a full read of the dataset, so the digests of a dataset's files are remembered in
``<memo_dir>/<fingerprint>.npz`` (next to the image-verification memo: ``$PAND_CACHE_DIR/content-digests``, else
``~/.cache/pand/content-digests``), keyed by the fingerprint of the whole dataset the split is part of, with each
file's modification time: a later run reads only files that are new or changed, and for the rest one ``stat`` each.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pand.data.base import ArrayDataset, ClassificationDataset, FileDataset, SubsetDataset
from pand.data.tar_shards import ShardDataset, ShardMember
from pand.data.verify import default_memo_dir
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from pand.io import atomic_write_with, mark_output_folder

__all__ = ["check_overlap", "compared_pairs", "digest_memo_dir", "item_digests"]

log = logging.getLogger("pand")

MEMO_SUBDIR = "content-digests"
#: How many pairs of files a message names per pair of splits (the count covers all of them).
MAX_LISTED = 3
#: Hashing is C code that releases the GIL on large buffers; a few threads keep a disk busy.
MAX_WORKERS = 8
#: From this many files to read, a line says what pand is doing.
NOTE_FILES = 1000
_CHUNK = 1 << 20
_DIGEST_BYTES = 32

def digest_memo_dir() -> Path | None:
    """``$PAND_CACHE_DIR/content-digests`` or ``~/.cache/pand/content-digests``; None without a home folder."""
    verified = default_memo_dir()
    return verified.parent / MEMO_SUBDIR if verified is not None else None


def compared_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs of split names that must not share an image (see the module docstring), in a fixed order."""
    tests = [n for n in names if n.startswith("test")]
    pairs = [("train", "val")] + [("train", t) for t in tests] + [("val", t) for t in tests]
    pairs += [("unlabelled", "val")] + [("unlabelled", t) for t in tests]
    return [(a, b) for a, b in pairs if a in names and b in names]


def check_overlap(
    splits: Mapping[str, ClassificationDataset],
    *,
    allow: bool = False,
    memo_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> dict[str, int]:
    """Compare the splits by content; raise (unless ``allow``) where a user's split shares images with another.

    Returns:
        ``{"<a>/<b>": n}`` for every pair compared: ``n`` items of split ``a`` have the content of an item of ``b``.

    Raises:
        ConfigError: one line naming the first few shared files of every offending pair, their counts, and
            ``data.allow_overlap``.
    """
    memo = Path(memo_dir).expanduser() if memo_dir is not None else digest_memo_dir()
    digests: dict[str, tuple[str, list[bytes]] | None] = {}

    def of(name: str) -> tuple[str, list[bytes]] | None:
        if name not in digests:
            digests[name] = item_digests(splits[name], memo_dir=memo, workers=workers)
        return digests[name]

    record: dict[str, int] = {}
    refused: list[str] = []
    noted: list[tuple[str, str]] = []
    for a, b in compared_pairs(list(splits)):
        if not len(splits[a]) or not len(splits[b]):
            record[f"{a}/{b}"] = 0
            continue
        da, db = of(a), of(b)
        if da is None or db is None or da[0] != db[0]:
            continue  # not comparable: an item kind without digests, or files against pixels
        first_in_b: dict[bytes, int] = {}
        for j, d in enumerate(db[1]):
            first_in_b.setdefault(d, j)
        shared = [(i, first_in_b[d]) for i, d in enumerate(da[1]) if d in first_in_b]
        record[f"{a}/{b}"] = len(shared)
        if not shared:
            continue
        text = _describe(splits, a, b, shared)
        if _source(splits[a]) == _source(splits[b]):
            noted.append((text, "the same image twice in the one split both were drawn from: kept"))
        elif _users_own(splits[a]) or _users_own(splits[b]):
            refused.append(text)
        else:
            noted.append((text, "duplicates within a published dataset's own splits: kept, as its protocol has them"))
    for text, why in noted:
        log.warning("%s (%s)", text, why)
    if refused:
        text = "; ".join(refused)
        if not allow:
            raise ConfigError(
                f"{text}: a val or test image must never be trained on. Remove the duplicates, or set "
                "data.allow_overlap=true to run anyway (the run summary records the overlap)")
        log.warning("%s (data.allow_overlap=true: kept, and recorded in the run summary)", text)
    return record


# -- which splits may share images ---------------------------------------------------------------------------------


def _unwrap(dataset: ClassificationDataset) -> tuple[ClassificationDataset, list[int]]:
    """The dataset underneath any subsets, and the indices of ``dataset``'s items in it."""
    indices: list[int] = list(range(len(dataset)))
    while isinstance(dataset, SubsetDataset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.parent
    return dataset, indices


def _source(dataset: ClassificationDataset) -> tuple[str, str, str, str]:
    base, _ = _unwrap(dataset)
    return type(base).__name__, base.name, base.split, str(base.root)


def _users_own(dataset: ClassificationDataset) -> bool:
    base, _ = _unwrap(dataset)
    return base.split == "unlabelled" or base.name in ("imagefolder", "shards")


def _describe(splits: Mapping[str, ClassificationDataset], a: str, b: str, shared: list[tuple[int, int]]) -> str:
    n = len(shared)
    pairs = ", ".join(_same(_item(splits[a], i), _item(splits[b], j)) for i, j in shared[:MAX_LISTED])
    more = f" and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
    also = f"images are also {b} images" if n > 1 else f"image is also a {b} image"
    return f"{n} {a} {also} (the same bytes): {pairs}{more}"


def _same(x: str, y: str) -> str:
    return f"{x} (one file in both)" if x == y else f"{x} = {y}"


def _item(dataset: ClassificationDataset, i: int) -> str:
    base, indices = _unwrap(dataset)
    k = indices[i]
    if isinstance(base, FileDataset):
        return str(base.root / base.relpaths[k])
    if isinstance(base, ShardDataset):
        return str(base.member(k))
    return f"{base.name} {base.split} image {base.sample_id(k)}"


# -- digests --------------------------------------------------------------------------------------------------------


def item_digests(
    dataset: ClassificationDataset, *, memo_dir: str | os.PathLike | None = None, workers: int | None = None
) -> tuple[str, list[bytes]] | None:
    """(kind, digest of every item in order): kind ``file`` (sha256 of the file, or of a tar shard's image member: the
    bytes the file would hold) or ``pixels`` (sha256 of the uint8 pixels and their shape); None for a dataset whose
    items are neither."""
    base, indices = _unwrap(dataset)
    if isinstance(base, ArrayDataset):
        shape = str(base.images.shape[1:]).encode()
        out = []
        for k in indices:
            h = hashlib.sha256(shape)
            h.update(np.ascontiguousarray(base.images[k]).tobytes())
            out.append(h.digest())
        return "pixels", out
    if isinstance(base, (FileDataset, ShardDataset)):
        memo = Path(memo_dir).expanduser() if memo_dir is not None else None
        table = _file_digests(base, indices, memo, workers)
        return "file", [table[k].tobytes() for k in indices]
    return None


def _file_digests(base: FileDataset | ShardDataset, indices: Sequence[int], memo: Path | None,
                  workers: int | None) -> np.ndarray:
    """The ``(len(base), 32)`` digest table of ``base``, with at least the rows of ``indices`` filled (a shard's
    samples are remembered with the modification time of their shard)."""
    n = len(base)
    fingerprint = base.fingerprint()  # stats every file: a missing one is a DatasetNotFoundError naming it
    digests, mtimes, done = _read_memo(memo, fingerprint, n)
    need = sorted(set(indices))
    need_arr = np.asarray(need, dtype=np.int64)
    if isinstance(base, ShardDataset):
        now = base.shard_mtimes()[need_arr]
    else:
        now = np.array([_mtime(base.root / base.relpaths[k]) for k in need], dtype=np.int64)
    stale = need_arr[~done[need_arr] | (mtimes[need_arr] != now)] if need else need_arr
    if len(stale):
        paths = [base.member(k) if isinstance(base, ShardDataset) else base.root / base.relpaths[k]
                 for k in stale.tolist()]
        n_workers = max(1, min(workers or MAX_WORKERS, os.cpu_count() or 1, len(paths)))
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pand-digest") as pool:
            for k, digest in zip(stale.tolist(), pool.map(_sha256, paths)):
                digests[k] = np.frombuffer(digest, dtype=np.uint8)
        mtimes[need_arr] = now
        done[stale] = True
        # a few files are not worth a line; thousands take long enough that the user should know why
        log.log(logging.INFO if len(stale) >= NOTE_FILES else logging.DEBUG, "read %d image files of %s/%s to compare "
                "the splits by content (remembered in %s)", len(stale), base.name, base.split, memo)
        if memo is not None:
            _write_memo(memo, fingerprint, digests, mtimes, done, f"{base.name}/{base.split}")
    return digests


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image file not found: {path}") from e


def _sha256(path: Path | ShardMember) -> bytes:
    if isinstance(path, ShardMember):
        return hashlib.sha256(path.read()).digest()
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image file not found: {path}") from e
    except OSError as e:
        raise PandError(f"cannot read image file {path}: {e.strerror or e}") from e
    return h.digest()


def _memo_path(memo: Path, fingerprint: str) -> Path:
    return memo / f"{fingerprint}.npz"


def _read_memo(memo: Path | None, fingerprint: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(digests, modification times, done) from the memo, or empty ones when there is none or it does not fit."""
    empty = (np.zeros((n, _DIGEST_BYTES), np.uint8), np.zeros(n, np.int64), np.zeros(n, bool))
    if memo is None:
        return empty
    path = _memo_path(memo, fingerprint)
    try:
        with np.load(path, allow_pickle=False) as z:
            digests, mtimes, done = z["digests"], z["mtimes"], z["done"]
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, KeyError) as e:
        # A damaged memo costs one more read of the files, never a wrong answer.
        log.debug("ignoring the content-digest memo %s (%s)", path, e)
        return empty
    if digests.shape != (n, _DIGEST_BYTES) or mtimes.shape != (n,) or done.shape != (n,):
        return empty
    return digests.astype(np.uint8, copy=True), mtimes.astype(np.int64, copy=True), done.astype(bool, copy=True)


def _write_memo(memo: Path, fingerprint: str, digests: np.ndarray, mtimes: np.ndarray, done: np.ndarray,
                where: str) -> None:
    try:
        memo.mkdir(parents=True, exist_ok=True)
        mark_output_folder(memo, "content-digests")
        atomic_write_with(_memo_path(memo, fingerprint),
                          lambda f: np.savez(f, digests=digests, mtimes=mtimes, done=done))
    except OSError as e:
        # Remembering is an optimisation: a read-only home must not stop a run whose data is fine.
        log.warning("cannot record the content digests of %s in %s (%s); the files will be read again next run",
                    where, memo, e)
