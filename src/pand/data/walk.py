"""The one directory walk behind every listing of image files: the class folders of ``data=imagefolder`` (and
ImageNet), ``data.unlabelled=<folder>`` and ``pand predict images=<folder or glob>``.

What :func:`walk` guarantees, and why:

* Links to folders are followed, each folder at most once: the ``(st_dev, st_ino)`` of every folder entered is
  remembered. A link to a folder already on the path being walked (the folder itself or one that contains it) is a
  loop and is refused, naming the link and the folder it points to: ``os.walk(followlinks=True)`` and
  ``Path.rglob`` count the files under such a link over and over, or never end. A second link to a folder that was
  already listed elsewhere is simply not entered again.
* A file is listed once even when links give it several names (its real path is remembered; the name that sorts
  first is kept), so no image weighs double in training or in a test score.
* ``within``: a link whose target lies outside that folder is refused, naming the link and its target: a dataset is
  the images inside its folder, and what lies elsewhere may change or belong to something else. ``avoid``: folders a
  link must not lead into (the other splits' folders of an image-folder dataset), so that a link cannot make a test
  image a training image.
* Folders pand wrote (holding :data:`pand.io.OUTPUT_MARKER`: run folders, caches, exports) are skipped with one
  warning line each, as pand's outputs are never its inputs; :func:`check_input_root` refuses a root that is one.
* Hidden entries (names starting with ``.``) are skipped, and the listing is sorted.
* Every other visible file is returned as well (``others``, never opened), so that a caller can say what a folder
  holds when it has no usable image, and can refuse image files of a type pand does not read
  (:data:`UNREAD_IMAGE_EXTENSIONS`) instead of leaving them out without a word.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pand.data.base import IMAGE_EXTENSIONS, ClassificationDataset, is_image_file
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from pand.io import OUTPUT_MARKER, is_output_folder

log = logging.getLogger("pand")

#: Image formats PIL can open but pand does not list: a folder holding them would lose those images silently, so
#: the split folders refuse them and the other listings warn. (Not read, rather than read: TIFF alone covers
#: multi-page, float and 16-bit-per-channel colour files whose 8-bit RGB view is a guess; GIF is often animated.)
UNREAD_IMAGE_EXTENSIONS = (
    ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".jpe", ".jp2", ".j2k", ".jpx", ".jpf",
    ".heic", ".heif", ".avif", ".ico", ".icns", ".tga", ".dib", ".pcx", ".psd", ".sgi", ".rgb", ".ras", ".dds",
    ".qoi", ".xbm", ".xpm",
)  # fmt: skip

#: How many files a message names (the count covers all of them).
MAX_LISTED = 5

_MAGIC = re.compile(r"[*?[]")
# Output folders already reported in this process: a dataset is listed several times per run (train, val, test).
_warned: set[str] = set()


def reads() -> str:
    """``.jpg .jpeg .png .bmp .webp``: the image types pand lists, for messages."""
    return " ".join(IMAGE_EXTENSIONS)


def is_unread_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(UNREAD_IMAGE_EXTENSIONS)


@dataclass
class Listing:
    """What :func:`walk` found under ``top``: POSIX paths relative to it, sorted."""

    top: Path
    files: list[str] = field(default_factory=list)  # accepted files (images pand reads), each real file once
    real: list[str] = field(default_factory=list)  # the real path of each of ``files``
    others: list[str] = field(default_factory=list)  # every other visible file, never opened

    def unread_images(self) -> list[str]:
        """The image files of a type pand does not read (:data:`UNREAD_IMAGE_EXTENSIONS`)."""
        return [p for p in self.others if is_unread_image(p.rsplit("/", 1)[-1])]

    def types_held(self) -> str:
        """``12 .gif, 3 .tif files`` (most frequent first), or ``no file`` when the folder holds none."""
        if not self.others:
            return "no file"
        counts = Counter(_extension(p) for p in self.others)
        parts = [f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return ", ".join(parts) + (" files" if len(self.others) > 1 else " file")


def _extension(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    ext = os.path.splitext(name)[1].lower()
    return ext if ext else "(no extension)"


def listed(paths: list, *, limit: int = MAX_LISTED) -> str:
    """``a, b, c`` with at most ``limit`` names, then ``and N more``."""
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _points(path: str, target: str) -> str:
    # The top of a walk may lie under a linked folder without being a link itself.
    return f"{path} is a link to {target}" if os.path.islink(path) else f"{path} resolves (through a link) to {target}"


class _Bounds:
    """Where a link may lead: inside ``within`` (if given) and into none of the ``avoid`` folders."""

    def __init__(self, within: str | os.PathLike | None, avoid: Mapping[str | os.PathLike, str] | None) -> None:
        self.within = os.path.realpath(within) if within is not None else None
        self.within_shown = str(within) if within is not None else None
        self.avoid = [(os.path.realpath(p), str(p), label) for p, label in (avoid or {}).items()]

    def check(self, path: str, target: str) -> None:
        if self.within is not None and not _inside(target, self.within):
            raise PandError(
                f"{_points(path, target)}, outside {self.within_shown}: pand reads only the images inside that "
                "folder; copy the files in instead of linking to them, or point the setting at the folder that holds "
                "them")
        for real, shown, label in self.avoid:
            if _inside(target, real):
                raise PandError(
                    f"{_points(path, target)}, inside {label} {shown}: the same image would be in two splits; "
                    "remove the link")


def walk(
    top: str | os.PathLike,
    *,
    within: str | os.PathLike | None = None,
    avoid: Mapping[str | os.PathLike, str] | None = None,
    accept: Callable[[str], bool] = is_image_file,
    max_depth: int | None = None,
) -> Listing:
    """Every file under ``top`` whose name ``accept`` takes (recursively; see the module docstring for the rules).

    Args:
        within: links (and ``top`` itself) must resolve inside this folder; None: anywhere.
        avoid: ``{folder: "the test split's folder"}``: folders no link may lead into, with how to name them.
        max_depth: enter at most this many folder levels below ``top`` (0: only the files directly in it).

    Raises:
        PandError: a link loop, a link leaving ``within`` or entering an ``avoid`` folder, an unreadable folder.
        DatasetNotFoundError: ``top`` does not exist, or a link to an accepted file points nowhere.
    """
    top = Path(top)
    bounds = _Bounds(within, avoid)
    real_top = os.path.realpath(top)
    bounds.check(str(top), real_top)
    try:
        st = os.stat(top)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"folder not found: {top}") from e
    except OSError as e:
        raise PandError(f"cannot read folder {top}: {e.strerror or e}") from e
    listing = Listing(top)
    found: list[tuple[str, str]] = []  # (relative path, real path)
    on_path: set[tuple[int, int]] = set()
    visited: set[tuple[int, int]] = set()
    # Depth-first with an explicit stack (deep trees must not hit Python's recursion limit); each frame is
    # (key, path, real path, relative prefix, depth, iterator over the sorted entries).
    stack: list[tuple[tuple[int, int], str, str, str, int, object]] = []

    def enter(path: str, real: str, rel: str, depth: int, key: tuple[int, int]) -> None:
        visited.add(key)
        if is_output_folder(path):
            _warn_output(path)
            return
        on_path.add(key)
        stack.append((key, path, real, rel, depth, iter(_entries(path))))

    enter(str(top), real_top, "", 0, (st.st_dev, st.st_ino))
    while stack:
        key, path, real, rel, depth, entries = stack[-1]
        entry = next(entries, None)  # type: ignore[call-overload]
        if entry is None:
            stack.pop()
            on_path.discard(key)
            continue
        name = entry.name
        if name.startswith("."):
            continue
        link = entry.is_symlink()
        if _is_dir(entry):
            if max_depth is not None and depth >= max_depth:
                continue
            target = os.path.realpath(entry.path) if link else os.path.join(real, name)
            try:
                est = entry.stat()
            except OSError as e:
                raise PandError(f"cannot read folder {entry.path}: {e.strerror or e}") from e
            child = (est.st_dev, est.st_ino)
            # A link to any folder holding this one loops, even one above ``top``: refused at once, not after
            # listing everything else under it first.
            if child in on_path or (link and _inside(real, target)):
                how = f"{entry.path} is a link to {target}" if link else f"{entry.path} is the same folder as {target}"
                raise PandError(f"{how}, a folder that contains it: following it would list the same images over and "
                                "over; remove the link")
            if child in visited:
                continue  # already listed under another name
            if link:
                bounds.check(entry.path, target)
            enter(entry.path, target, f"{rel}{name}/", depth + 1, child)
        elif accept(name):
            if link:
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    raise DatasetNotFoundError(f"{entry.path} is a link to {target}, which does not exist")
                bounds.check(entry.path, target)
            else:
                target = os.path.join(real, name)
            found.append((rel + name, target))
        else:
            listing.others.append(rel + name)
    seen: set[str] = set()
    for relpath, target in sorted(found):
        if target not in seen:
            seen.add(target)
            listing.files.append(relpath)
            listing.real.append(target)
    listing.others.sort()
    return listing


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        # os.walk would skip an unreadable folder without a word, and its images with it.
        raise PandError(f"cannot list folder {path}: {e.strerror or e}") from e


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling one is not a folder
    except OSError as e:
        raise PandError(f"cannot read {entry.path}: {e.strerror or e}") from e


def _warn_output(path: str) -> None:
    if path not in _warned:
        _warned.add(path)
        log.warning("skipping %s: a folder pand wrote (%s), not input images", path, output_kind(path))


def output_kind(folder: str | os.PathLike) -> str:
    """What the :data:`~pand.io.OUTPUT_MARKER` of ``folder`` says it is (``run``, ``teacher-cache``, ...)."""
    try:
        kind = (Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError):
        return "pand output"
    return f"{kind[0]} output" if kind and kind[0] else "pand output"


def check_input_root(path: str | os.PathLike, what: str) -> None:
    """Refuse an input folder that is, or lies inside, a folder pand wrote (run folder, cache, export)."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    for folder in (real, *real.parents):
        if is_output_folder(folder):
            where = "is" if folder == real else f"lies inside {folder},"
            raise ConfigError(
                f"{what}={path} {where} a folder pand wrote ({output_kind(folder)}; it holds {OUTPUT_MARKER}): pand "
                "never reads its own outputs as input images; point it at your images")


# -- globs -------------------------------------------------------------------------------------------------------------


def glob_parts(pattern: str) -> tuple[Path, list[str]] | None:
    """(the folder before the first wildcard, the pattern's components after it); None without a wildcard."""
    parts = Path(pattern).parts
    first = next((i for i, p in enumerate(parts) if _MAGIC.search(p)), None)
    if first is None:
        return None
    return (Path(*parts[:first]) if first else Path(".")), list(parts[first:])


def _matches(pattern: list[str], parts: list[str]) -> bool:
    """glob's rules per path component: ``*`` and ``?`` stay within one, ``**`` spans any number (zero included)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _matches(pattern[1:], parts) or (bool(parts) and _matches(pattern, parts[1:]))
    return bool(parts) and fnmatch.fnmatch(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def glob(pattern: str, *, accept: Callable[[str], bool] = is_image_file) -> tuple[list[Path], list[Path]]:
    """(accepted files, unread image files) matching a glob pattern, found by :func:`walk` (``**`` recursive).

    The same matches as ``glob.glob(pattern, recursive=True)`` for files, but a link loop is refused instead of
    followed until the path is too long, a file is listed once, and pand's output folders are skipped.
    """
    split = glob_parts(pattern)
    if split is None:
        return [], []
    base, parts = split
    if not base.is_dir():
        return [], []
    check_input_root(base, "images")
    depth = None if "**" in parts else len(parts) - 1
    listing = walk(base, accept=accept, max_depth=depth)

    def keep(paths: list[str]) -> list[Path]:
        return [base / p for p in paths if _matches(parts, p.split("/"))]

    return keep(listing.files), keep(listing.unread_images())


def input_folders(splits: Mapping[str, ClassificationDataset]) -> dict[str, Path]:
    """The folder each split's images come from (resolved)."""
    return {name: Path(ds.root).expanduser().resolve() for name, ds in splits.items() if ds.root is not None}


def refuse_outputs_inside(inputs: Mapping[str, Path], outputs: Mapping[str, Any]) -> None:
    """Refuse an output folder (``{setting: folder}``, None for unused) inside a folder a run reads images from:
    pand never writes into a dataset, and a later walk over that folder must not meet pand's outputs."""
    for what, path in outputs.items():
        if not path:
            continue
        out = Path(path).expanduser().resolve()
        for split, folder in inputs.items():
            if out == folder or folder in out.parents:
                raise ConfigError(f"{what}={path} is inside {folder}, the folder of the {split} images; pand never "
                                  f"writes into a dataset: choose a {what} outside it")
