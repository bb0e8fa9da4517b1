"""Oxford-IIIT Pet: 37 breeds, 3,680 official trainval / 3,669 test images.

Official files: ``images/<Breed>_<n>.jpg`` and ``annotations/{trainval,test}.txt`` with lines
``image CLASS-ID SPECIES BREED-ID`` (comment lines start with ``#``). Labels come from the CLASS-ID column (1..37);
BREED-ID restarts per species and must not be used. Class names are the file-name prefix of the class's images with
underscores turned into spaces (so ``american_bulldog`` and ``american_pit_bull_terrier`` stay two classes).
The official ``trainval`` file is pand's training split; ``val`` is carved from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from pand.data import base
from pand.data.download import download_and_extract
from pand.data.registry import register_dataset
from pand.errors import PandError

TITLE = "Oxford-IIIT Pet"
FOLDER = "oxford-iiit-pet"
HAS_OFFICIAL_VAL = False
MARKERS = ("annotations", "images")
NUM_CLASSES = 37

# Where download=True fetches the data. ``None`` entries are filled on first use from torchvision's own
# ``OxfordIIITPet._RESOURCES`` (imported lazily). Tests monkeypatch the entries with file:// archives.
SOURCES: dict[str, dict | None] = {"images": None, "annotations": None}

LAYOUT = """\
  <root>/oxford-iiit-pet/         (or pass the oxford-iiit-pet folder itself as root)
    images/Abyssinian_1.jpg, images/american_bulldog_10.jpg ...
    annotations/trainval.txt      <image> <CLASS-ID 1..37> <SPECIES> <BREED-ID>
    annotations/test.txt          <image> <CLASS-ID 1..37> <SPECIES> <BREED-ID>"""

_SPLIT_FILES = {"train": "trainval.txt", "test": "test.txt"}


def sources() -> dict[str, dict]:
    if any(v is None for v in SOURCES.values()):
        from torchvision.datasets import OxfordIIITPet

        for url, md5 in OxfordIIITPet._RESOURCES:
            key = "images" if "images" in url.rsplit("/", 1)[-1] else "annotations"
            if SOURCES.get(key) is None:
                SOURCES[key] = {"url": url, "md5": md5, "filename": url.rsplit("/", 1)[-1]}
    return SOURCES  # type: ignore[return-value]


def download(root: str | os.PathLike) -> None:
    dest = Path(root).expanduser() / FOLDER
    for src in sources().values():
        download_and_extract(src["url"], dest, src["md5"], src.get("filename"), layout=LAYOUT)


class _Row(NamedTuple):
    """One annotation line: where it is, and the two columns pand uses."""

    path: Path
    no: int
    line: str
    image: str
    cid: int

    @property
    def at(self) -> str:
        return f"line {self.no} of {self.path} ({self.line!r})"


def _parse(path: Path) -> list[_Row]:
    rows = []
    for no, line in base.read_lines(path):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise base.malformed(path, no, line, "'<image> <CLASS-ID> <SPECIES> <BREED-ID>'")
        cid = int(parts[1])
        if not 1 <= cid <= NUM_CLASSES:
            # Accepting it would silently add a class the official list does not have.
            raise PandError(
                f"line {no} of {path} ({line!r}): CLASS-ID {cid} is not an official Oxford-IIIT Pet class; "
                f"the official CLASS-IDs are 1..{NUM_CLASSES}"
            )
        rows.append(_Row(path, no, line, parts[0], cid))
    return rows


def _class_prefixes(rows: list[_Row]) -> dict[int, str]:
    """CLASS-ID -> the file-name prefix all its images share; each prefix belongs to one CLASS-ID only."""
    first_of_id: dict[int, _Row] = {}
    first_of_name: dict[str, _Row] = {}
    for row in rows:
        prefix = _prefix(row.image)
        first = first_of_id.setdefault(row.cid, row)
        if _prefix(first.image) != prefix:
            raise PandError(
                f"{row.at}: image {row.image!r} has CLASS-ID {row.cid}, but CLASS-ID {row.cid} is "
                f"{_prefix(first.image)!r} at {first.at}; every image of a class must be named after its breed"
            )
        # Two ids with one name would train two classes under one (duplicated) class name.
        key = base.clean_name(prefix).casefold()
        other = first_of_name.setdefault(key, row)
        if other.cid != row.cid:
            raise PandError(
                f"{row.at}: breed {prefix!r} has CLASS-ID {row.cid}, but it is CLASS-ID {other.cid} at {other.at}; "
                "each breed must have exactly one CLASS-ID (the class name would be listed twice)"
            )
    return {cid: _prefix(row.image) for cid, row in first_of_id.items()}


def _prefix(image: str) -> str:
    return image.rsplit("_", 1)[0] if "_" in image else image


@register_dataset("pets")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"`` (= trainval.txt) or ``"test"`` split."""
    base.check_split(split, ("train", "test"))
    d = base.dataset_dir(__name__, root, download)
    files = {s: base.require(d / "annotations" / f, TITLE, LAYOUT, download=True) for s, f in _SPLIT_FILES.items()}
    base.require(d / "images", TITLE, LAYOUT, download=True)
    rows = {s: _parse(p) for s, p in files.items()}

    # class names: the file-name prefix of each CLASS-ID's images, over both files so train and test agree
    prefix = _class_prefixes(rows["train"] + rows["test"])
    n = max(prefix, default=0)  # tiny copies may use fewer classes, but always 1..n
    missing = [cid for cid in range(1, n + 1) if cid not in prefix]
    if missing:
        raise PandError(
            f"CLASS-ID {missing[0]} has no image in {files['train']} or {files['test']}; ids must be 1..{n}"
        )
    classes = [base.clean_name(prefix[cid]) for cid in range(1, n + 1)]

    relpaths = [f"images/{row.image}.jpg" for row in rows[split]]
    targets = [row.cid - 1 for row in rows[split]]
    base.check_files_exist(d, relpaths, files[split], TITLE)
    return base.FileDataset("pets", split, classes, d, relpaths, targets)
