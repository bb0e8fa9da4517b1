"""Helpers for datasets stored as one folder per class (``imagefolder``, ``imagenet``): the class folders of a split,
the images under them, and display names for the folders from a ``class_names_file``.

They live apart from the dataset modules so that no dataset module imports another (importing one registers it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pand.data import base
from pand.data.walk import listed, reads, walk
from pand.errors import ConfigError, DatasetNotFoundError, PandError


def subdirs(d: Path) -> list[str]:
    """The sub-folders of ``d`` (hidden ones skipped) in sorted order: the class folders of a split."""
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def images_under(d: Path, *, within: str | os.PathLike | None = None) -> list[str]:
    """Image files under ``d`` (recursive, each real file once, no link leaving ``within``), as sorted POSIX paths
    relative to ``d``; see :func:`pand.data.walk.walk`."""
    return walk(d, within=within).files


#: The folders of a one-folder-per-class layout that hold a split each.
SPLIT_FOLDERS = ("train", "val", "test")


def list_images(
    root: Path, split_dir: str, folders: Sequence[str], index: Mapping[str, int], *,
    classes: Sequence[str] | None = None,
) -> tuple[list[str], list[int]]:
    """(relative paths, labels) of the images in ``root/split_dir/<folder>/`` for every folder of ``folders``.

    Paths are ``<split_dir>/<folder>/<file>`` (POSIX, relative to ``root``); the label of a folder is ``index[folder]``.
    No link may lead out of ``root`` or into another split's folder. In ``train`` every class folder must hold an
    image pand reads (``classes``: display names for that message), and no split folder may hold image files of a type
    pand skips: either would leave images out of training or out of the test score without a word.
    """
    split_path = root / split_dir
    avoid = _other_splits(root, split_dir)
    relpaths, targets, unread = [], [], []
    first_name: dict[str, Path] = {}  # real path -> the name it was first listed under in this split
    for folder in folders:
        listing = walk(split_path / folder, within=root, avoid=avoid)
        if split_dir == "train" and not listing.files:
            name = classes[index[folder]] if classes is not None else folder
            raise PandError(
                f"class {name!r} ({split_path / folder}) has no usable image: it holds {listing.types_held()}; "
                f"pand reads {reads()}")
        unread += [split_path / folder / p for p in listing.unread_images()]
        for f, real in zip(listing.files, listing.real):
            seen = first_name.setdefault(real, split_path / folder / f)
            if seen != split_path / folder / f:
                # two class folders reaching one file through links: one image with two labels
                raise PandError(f"{split_path / folder / f} and {seen} are one file ({real}), in two class folders; "
                                "remove the link")
            relpaths.append(f"{split_dir}/{folder}/{f}")
            targets.append(index[folder])
    if unread:
        raise PandError(
            f"{len(unread)} image file{'s' if len(unread) > 1 else ''} in {split_path} "
            f"{'are' if len(unread) > 1 else 'is'} of a type pand does not read: {listed(unread)}; pand reads "
            f"{reads()}: convert them (e.g. to .png) or move them out, so that every image of the split counts")
    return relpaths, targets


def _other_splits(root: Path, split_dir: str) -> dict[Path, str]:
    """The other split folders under ``root`` (as folders no link may lead into), after making sure that no two split
    folders are one folder or lie inside each other (a link such as ``val -> train`` would make them share images)."""
    here = root / split_dir
    real_here = os.path.realpath(here)
    others: dict[Path, str] = {}
    for name in SPLIT_FOLDERS:
        other = root / name
        if name == split_dir or not other.is_dir():
            continue
        real = os.path.realpath(other)
        if real == real_here:
            raise PandError(f"{here} and {other} are one folder ({real}): the two splits would share their images; "
                            "give every split its own folder")
        for a, ra, b, rb in ((here, real_here, other, real), (other, real, here, real_here)):
            if ra.startswith(rb.rstrip(os.sep) + os.sep):
                raise PandError(f"{a} ({ra}) lies inside {b} ({rb}): the two splits would share images; give every "
                                "split its own folder")
        others[other] = "another split's folder"
    return others


def read_class_names(path: str | os.PathLike, folders: list[str]) -> list[str]:
    """Display names for ``folders`` from ``path`` (positional list, or ``folder<TAB|,>name`` mapping)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(f"class_names_file not found: {path}")
    lines = base.read_lines(path)
    mapping = _as_mapping(path, lines, folders)
    if mapping is not None:
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ConfigError(f"{path} gives no display name for class folder {missing[0]!r}")
        names = [mapping[f] for f in folders]
    else:
        if len(lines) != len(folders):
            raise ConfigError(
                f"{path} has {len(lines)} names but there are {len(folders)} class folders; write one name per line "
                "in sorted folder order, or 'folder_name<TAB or comma>display name' lines"
            )
        names = lines
    _check_unique(path, names)
    return [name for _, name in names]


def _as_mapping(path: Path, lines: list[tuple[int, str]], folders: list[str]) -> dict[str, tuple[int, str]] | None:
    """folder -> (line number, display name) if every line is ``folder<TAB|,>name``; None for a positional list."""
    known = set(folders)
    rows = []
    for no, line in lines:
        sep = "\t" if "\t" in line else ("," if "," in line else None)
        if sep is None:
            return None
        key, name = (s.strip() for s in line.split(sep, 1))
        if key not in known:
            return None
        rows.append((no, key, name))
    if not rows:
        return None
    mapping: dict[str, tuple[int, str]] = {}
    for no, key, name in rows:
        if key in mapping:
            raise ConfigError(f"line {no} of {path}: class folder {key!r} is already named at line {mapping[key][0]}")
        mapping[key] = (no, name)
    return mapping


def _check_unique(path: Path, names: list[tuple[int, str]]) -> None:
    # Two folders with one display name would train two classes that CLIP prompts cannot tell apart.
    first: dict[str, int] = {}
    for no, name in sorted(names):  # file order, so the later of two lines is the one reported
        seen = first.setdefault(" ".join(name.split()).casefold(), no)
        if seen != no:
            raise ConfigError(
                f"line {no} of {path}: display name {name!r} is already used at line {seen}; "
                "every class needs its own name"
            )
