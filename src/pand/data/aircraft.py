"""FGVC-Aircraft 2013b, variant level: 100 classes, official train / val / test thirds of 10,000 images.

Official files: ``data/images/<id>.jpg``, ``data/variants.txt`` (one variant per line, the label order) and
``data/images_variant_{train,val,test}.txt`` (``<id> <variant with spaces>``). Class names are the variant names as
written in variants.txt. This is the one dataset with an official validation split, used as ``val`` as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from pand.data import base
from pand.data.download import download_and_extract
from pand.data.registry import register_dataset
from pand.errors import PandError

TITLE = "FGVC-Aircraft 2013b"
FOLDER = "fgvc-aircraft-2013b"
HAS_OFFICIAL_VAL = True
MARKERS = ("data/variants.txt", "data/images")

# Where download=True fetches the data. ``None`` entries are filled on first use from torchvision's own
# ``FGVCAircraft._URL`` (imported lazily: importing torchvision.datasets costs seconds). torchvision publishes no md5
# for this archive, so the checksum is skipped (md5=None). Tests monkeypatch the entry with a file:// archive.
SOURCES: dict[str, dict | None] = {"archive": None}

LAYOUT = """\
  <root>/fgvc-aircraft-2013b/     (or pass the fgvc-aircraft-2013b folder itself as root)
    data/images/1025794.jpg ...
    data/variants.txt             one variant name per line (label order)
    data/images_variant_train.txt <image id> <variant>
    data/images_variant_val.txt   <image id> <variant>
    data/images_variant_test.txt  <image id> <variant>"""


def sources() -> dict[str, dict]:
    if SOURCES.get("archive") is None:
        from torchvision.datasets import FGVCAircraft

        url = FGVCAircraft._URL
        SOURCES["archive"] = {
            "url": url,
            "md5": getattr(FGVCAircraft, "_MD5", None),
            "filename": url.rsplit("/", 1)[-1],
        }
    return SOURCES  # type: ignore[return-value]


def download(root: str | os.PathLike) -> None:
    src = sources()["archive"]
    download_and_extract(src["url"], Path(root).expanduser(), src["md5"], src.get("filename"), layout=LAYOUT)


def _read_variants(path: Path) -> list[str]:
    """The variant names of variants.txt in label order; a variant listed twice is an error naming both lines."""
    first_line: dict[str, int] = {}
    for no, variant in base.read_lines(path):
        first = first_line.setdefault(variant, no)
        if first != no:
            # Two labels for one variant: images could only ever get the first, the second class would stay empty.
            raise PandError(f"line {no} of {path}: variant {variant!r} is already listed at line {first}")
    return list(first_line)


@register_dataset("aircraft")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"``, ``"val"`` or ``"test"`` split."""
    base.check_split(split, ("train", "val", "test"))
    d = base.dataset_dir(__name__, root, download)
    variants_file = base.require(d / "data" / "variants.txt", TITLE, LAYOUT, download=True)
    classes = _read_variants(variants_file)
    index = {v: i for i, v in enumerate(classes)}
    listing = base.require(d / "data" / f"images_variant_{split}.txt", TITLE, LAYOUT, download=True)
    base.require(d / "data" / "images", TITLE, LAYOUT, download=True)
    relpaths, targets = [], []
    for no, line in base.read_lines(listing):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise base.malformed(listing, no, line, "'<image id> <variant>'")
        image_id, variant = parts[0], parts[1].strip()
        if variant not in index:
            raise PandError(f"line {no} of {listing}: variant {variant!r} is not listed in {variants_file}")
        relpaths.append(f"data/images/{image_id}.jpg")
        targets.append(index[variant])
    base.check_files_exist(d, relpaths, listing, TITLE)
    return base.FileDataset("aircraft", split, classes, d, relpaths, targets)
