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

from pand.data import base
from pand.data.download import download_and_extract
from pand.errors import PandError

TITLE = "Oxford-IIIT Pet"
FOLDER = "oxford-iiit-pet"
HAS_OFFICIAL_VAL = False
MARKERS = ("annotations", "images")

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


def dataset_dir(root: str | os.PathLike, download_missing: bool = False) -> Path:
    return base.locate_dataset(root, FOLDER, MARKERS, TITLE, LAYOUT, download, download_missing)


def _parse(path: Path) -> list[tuple[str, int]]:
    rows = []
    for no, line in base.read_lines(path):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise base.malformed(path, no, line, "'<image> <CLASS-ID> <SPECIES> <BREED-ID>'")
        rows.append((parts[0], int(parts[1])))
    return rows


def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"`` (= trainval.txt) or ``"test"`` split."""
    base.check_split(split, ("train", "test"))
    d = dataset_dir(root, download)
    files = {s: base.require(d / "annotations" / f, TITLE, LAYOUT, download=True) for s, f in _SPLIT_FILES.items()}
    base.require(d / "images", TITLE, LAYOUT, download=True)
    rows = {s: _parse(p) for s, p in files.items()}

    # class names: the file-name prefix of each CLASS-ID's images, over both files so train and test agree
    prefix: dict[int, str] = {}
    for s in ("train", "test"):
        for image, cid in rows[s]:
            prefix.setdefault(cid, image.rsplit("_", 1)[0] if "_" in image else image)
    n = max(prefix, default=0)
    missing = [cid for cid in range(1, n + 1) if cid not in prefix]
    if missing:
        raise PandError(
            f"CLASS-ID {missing[0]} has no image in {files['train']} or {files['test']}; ids must be 1..{n}"
        )
    classes = [base.clean_name(prefix[cid]) for cid in range(1, n + 1)]

    relpaths = [f"images/{image}.jpg" for image, _ in rows[split]]
    targets = [cid - 1 for _, cid in rows[split]]
    base.check_files_exist(d, relpaths, files[split], TITLE)
    return base.FileDataset("pets", split, classes, d, relpaths, targets)
