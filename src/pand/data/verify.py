"""Decode every image of a dataset once before training, so a bad file stops the run at the start, not hours in.

:func:`verify_splits` (and :func:`verify_images` for one split) fully decodes every image file of the given splits
with PIL, exactly as :func:`~pand.data.base.open_rgb` does when training reads it, and reports ALL bad files in one
:class:`~pand.errors.CorruptImageError` so the user can fix them in one go. In-memory datasets (Fashion-MNIST) hold
decoded pixels already and are skipped.

A split that decoded cleanly is remembered by an empty-ish marker file ``<memo_dir>/<fingerprint>.json``; the next
run finds it and skips the work. The fingerprint covers every item's relative path, file size and label, so adding,
removing, relabelling or replacing a file with one of another size verifies the split again. (A file changed in place
to the same size is not noticed; delete the memo folder to force a new check.) The default memo folder is
``$PAND_CACHE_DIR/verified-images``, else ``~/.cache/pand/verified-images``; when it cannot be written, verification
still succeeds, it is just not remembered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pand.data.base import ArrayDataset, ClassificationDataset, FileDataset, SubsetDataset, open_rgb, user_cache_dir
from pand.data.tar_shards import ShardDataset, ShardMember
from pand.data.tar_shards import decode_error as member_decode_error
from pand.errors import CorruptImageError, DatasetNotFoundError
from pand.io import atomic_write_json
from pand.logs import tracked

__all__ = ["default_memo_dir", "verify_images", "verify_splits"]

log = logging.getLogger("pand")

MEMO_SUBDIR = "verified-images"
#: Below this many files a progress bar only flickers.
PROGRESS_MIN_FILES = 200
#: How many bad files a message lists (the count covers all of them).
MAX_LISTED = 5
#: Decoding is mostly C code that releases the GIL; a few threads saturate a local disk without hogging the machine.
MAX_WORKERS = 8

_MISSING = "file not found"


#: An image to check: a file, or the image member of a sample of a tar shard.
_Item = Path | ShardMember


@dataclass(frozen=True)
class _Bad:
    path: _Item
    reason: str
    where: str  # "<name>/<split>" of the first split that lists the file


def _order(item: _Item) -> tuple[int, Any]:
    # Files first, then shard members, each kind in its own order (a Path and a ShardMember do not compare).
    return (0, item) if isinstance(item, Path) else (1, item)


def default_memo_dir() -> Path | None:
    """``$PAND_CACHE_DIR/verified-images`` or ``~/.cache/pand/verified-images``; None if there is no home folder."""
    base = user_cache_dir()  # None: nowhere to remember, but nothing is wrong with the data
    return base / MEMO_SUBDIR if base is not None else None


def verify_images(
    dataset: ClassificationDataset,
    *,
    memo_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> None:
    """Decode every image file of ``dataset`` once; raise if any cannot be decoded.

    A :class:`SubsetDataset` checks only its own items (files of its parent). An :class:`ArrayDataset` (or a subset
    of one) holds decoded pixels and returns at once.

    Args:
        memo_dir: folder of the "verified" markers (default: :func:`default_memo_dir`).
        progress: show a progress bar for splits of many files.
        workers: decoding threads (default: up to 8).

    Raises:
        CorruptImageError: one or more files cannot be decoded; the message names the first (sorted by path), the
            split, how many are bad, and lists a few more.
        DatasetNotFoundError: an image file is missing.
        TypeError: ``dataset`` is another kind (e.g. already wrapped in a decoded-image cache).
    """
    verify_splits({dataset.split: dataset}, memo_dir=memo_dir, progress=progress, workers=workers)


def verify_splits(
    splits: Mapping[str, ClassificationDataset],
    *,
    memo_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> None:
    """:func:`verify_images` for every split (train, val, test, ...) before training starts.

    Every split is checked before anything is raised, so one error lists the bad files of all splits. A split whose
    fingerprint was already handled in this call, or that has a memo marker, is skipped, and a file shared by two
    splits is decoded once.
    """
    memo = Path(memo_dir).expanduser() if memo_dir is not None else default_memo_dir()
    seen: set[str] = set()
    checked: dict[_Item, str | None] = {}  # item -> reason it is bad, or None; shared by the splits of this call
    bad: list[_Bad] = []
    for dataset in splits.values():
        files = _image_files(dataset)
        if files is None:
            continue
        fingerprint = dataset.fingerprint()  # stats every file: a missing one is a DatasetNotFoundError naming it
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        where = f"{dataset.name}/{dataset.split}"
        if memo is not None and _memo_exists(memo, fingerprint):
            log.debug("images of %s were verified before (%s)", where, _memo_path(memo, fingerprint))
            continue
        todo = [p for p in dict.fromkeys(files) if p not in checked]
        checked.update(_decode_all(todo, where, progress=progress, workers=workers))
        # a bad file shared with an earlier split is already reported under that split
        new_bad = [p for p in todo if checked[p] is not None]
        bad.extend(_Bad(p, checked[p], where) for p in new_bad)  # type: ignore[arg-type]
        if all(checked[p] is None for p in files):
            log.info("verified %d images of %s", len(files), where)
            if memo is not None:
                _write_memo(memo, fingerprint, dataset, where)
    _raise_if_bad(bad)


# -- finding the files ------------------------------------------------------------------------------------------------


def _image_files(dataset: ClassificationDataset) -> list[_Item] | None:
    """Absolute paths (or shard members) of the items of ``dataset`` in item order; None when its images are held
    decoded in memory."""
    indices: Sequence[int] = range(len(dataset))
    while isinstance(dataset, SubsetDataset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.parent
    if isinstance(dataset, ArrayDataset):
        return None
    if isinstance(dataset, ShardDataset):
        return [dataset.member(i) for i in indices]
    if not isinstance(dataset, FileDataset):
        raise TypeError(
            f"verify_images needs a FileDataset, ShardDataset, ArrayDataset or a subset of one, not "
            f"{type(dataset).__name__}; "
            "verify the dataset before wrapping it"
        )
    return [dataset.root / dataset.relpaths[i] for i in indices]


# -- decoding ---------------------------------------------------------------------------------------------------------


def _decode_error(path: _Item) -> str | None:
    """Why ``path`` cannot be decoded the way training decodes it, or None if it can."""
    if isinstance(path, ShardMember):
        try:
            return member_decode_error(path)
        except DatasetNotFoundError:
            return _MISSING
    try:
        open_rgb(path)  # the very decode training, caches and predict use, so "verified" means "trainable"
    except DatasetNotFoundError:
        return _MISSING
    except CorruptImageError as e:
        cause = e.__cause__ or e
        # PIL often repeats the file name; the message names it once already.
        return str(cause).replace(f" {str(path)!r}", "").strip() or type(cause).__name__
    return None


def _decode_all(
    paths: Sequence[_Item], where: str, *, progress: bool, workers: int | None
) -> list[tuple[_Item, str | None]]:
    """(path, reason or None) for every path, in the order given."""
    if not paths:
        return []
    n_workers = max(1, min(workers or MAX_WORKERS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pand-verify") as pool:
        results: Iterable[str | None] = pool.map(_decode_error, paths)
        with tracked(results, progress and len(paths) >= PROGRESS_MIN_FILES, total=len(paths),
                     description=f"checking images of {where}") as steps:
            return list(zip(paths, steps))


# -- reporting --------------------------------------------------------------------------------------------------------


def _raise_if_bad(bad: list[_Bad]) -> None:
    if not bad:
        return
    missing = sorted((b for b in bad if b.reason == _MISSING), key=lambda b: _order(b.path))
    if missing:
        # A file that vanished after the dataset was listed: the folder is incomplete, not corrupt.
        splits = ", ".join(dict.fromkeys(b.where for b in missing))
        raise DatasetNotFoundError(
            f"image file not found (listed in {splits}): {_listing(missing, with_reason=False)}. "
            "The image folder is incomplete; re-extract the dataset archive."
        )
    splits = ", ".join(dict.fromkeys(b.where for b in bad))  # in the order the splits were given
    corrupt = sorted(bad, key=lambda b: _order(b.path))
    n = len(corrupt)
    shards = " (for tar shards: or set data.skip_bad=true to leave their samples out)" \
        if any(isinstance(b.path, ShardMember) for b in corrupt) else ""
    raise CorruptImageError(
        f"{n} image{'s' if n > 1 else ''} of {splits} cannot be decoded: {_listing(corrupt, with_reason=True)}. "
        f"Replace or remove them (and their lines in the dataset's annotation files){shards}, then run again."
    )


def _listing(bad: list[_Bad], *, with_reason: bool) -> str:
    """``first (reason); and N more: a (reason), b (reason), ...`` with at most MAX_LISTED files named."""
    several_splits = len({b.where for b in bad}) > 1

    def describe(b: _Bad) -> str:
        text = str(b.path)
        if several_splits:
            text += f" [{b.where}]"
        return f"{text} ({b.reason})" if with_reason else text

    text = describe(bad[0])
    rest = bad[1:]
    if rest:
        shown = ", ".join(describe(b) for b in rest[: MAX_LISTED - 1])
        etc = ", ..." if len(rest) > MAX_LISTED - 1 else ""
        text += f"; and {len(rest)} more: {shown}{etc}"
    return text


# -- memo -------------------------------------------------------------------------------------------------------------


def _memo_path(memo: Path, fingerprint: str) -> Path:
    return memo / f"{fingerprint}.json"


def _memo_exists(memo: Path, fingerprint: str) -> bool:
    try:
        return _memo_path(memo, fingerprint).is_file()
    except OSError:  # unreadable memo folder: just verify again
        return False


def _write_memo(memo: Path, fingerprint: str, dataset: ClassificationDataset, where: str) -> None:
    record = {
        "name": dataset.name,
        "split": dataset.split,
        "n": len(dataset),
        "root": str(dataset.root) if dataset.root is not None else None,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        atomic_write_json(_memo_path(memo, fingerprint), record)
    except OSError as e:
        # Remembering is an optimisation: a read-only home must not stop a run whose data is fine.
        log.warning(
            "images of %s are fine, but cannot record that in %s (%s); they will be checked again next run",
            where,
            memo,
            e,
        )
