"""ImageNet (ILSVRC-2012): 1,000 classes, 1,281,167 official train / 50,000 official val images, one folder per class.

Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (the val images already sorted into class
folders, as timm and PyTorch's ImageNet example expect), or the same under ``<root>/imagenet/``. Classes are the
WordNet-id folders of ``train`` in sorted order; ``val`` must hold exactly the same class folders.

Splits: the official val set is what papers report, so it is pand's ``test`` split; pand's ``val`` is carved from the
official train split (stratified, seeded) so that no choice is ever made on the test images.

Class names: the first name of each synset from a ``class_names_file`` in synset-mapping format, else from
``<root>/LOC_synset_mapping.txt`` (lines ``n01440764 tench, Tinca tinca`` -> ``tench``), else the folder names.
Lines for synsets without a folder are ignored (a subset such as ImageNet-100 works with the full file). A few synsets
share their first name (``crane`` is n02012849 and n03126707, ``maillot`` n03710637 and n03710721); every class
sharing a name gets its WordNet id appended (``crane (n02012849)``), so that no two classes get the same prompt. A
``class_names_file`` in another format is read as :func:`pand.data.folders.read_class_names` does (one name per
line in sorted folder order, or ``wnid<TAB or comma>name`` lines), e.g. CLIP's curated ImageNet class names.

ImageNet cannot be downloaded automatically: it needs an account at image-net.org.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pand.data import base, folders as class_folders
from pand.data.registry import register_dataset
from pand.errors import ConfigError, DatasetNotFoundError

TITLE = "ImageNet (ILSVRC-2012)"
FOLDER = "imagenet"
HAS_OFFICIAL_VAL = False
MARKERS = ("train", "val")
SPLIT_DIRS = {"train": "train", "test": "val"}
SYNSET_FILE = "LOC_synset_mapping.txt"

LAYOUT = """\
  <root>/                         (or <root>/imagenet/)
    train/n01440764/n01440764_10026.JPEG ...        one folder per class (WordNet id)
    val/n01440764/ILSVRC2012_val_00000293.JPEG ...  the official val images sorted into the same class folders
    LOC_synset_mapping.txt        (optional) lines 'n01440764 tench, Tinca tinca'; class name = first synset name
  pand's test split is the official val folder; pand's val split is carved from train.
  ImageNet cannot be downloaded automatically (it needs an account at https://image-net.org): download
  ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar there, extract them into train/ and val/, and sort the val
  images into class folders (e.g. with the valprep.sh script of PyTorch's ImageNet example)."""

# A synset-mapping line: "<WordNet id> <name>[, <synonym>...]" (separated by spaces, not a tab or a comma).
_SYNSET_LINE = re.compile(r"^(n\d{8}) +(\S.*)$")


def dataset_dir(root: str | os.PathLike, download: bool = False) -> Path:
    """``root/imagenet`` or ``root``, whichever holds ``train`` or ``val``; else DatasetNotFoundError."""
    found = base.find_dataset_dir(root, FOLDER, MARKERS)
    if found is None:
        note = " (download=True cannot fetch it: ImageNet needs a login)" if download else ""
        raise base.not_found(
            f"{TITLE} not found under {root}{note}", Path(root) / "train", TITLE, LAYOUT, download=False
        )
    return found


def read_synset_mapping(path: Path, folders: Sequence[str], *, strict: bool = True) -> list[str] | None:
    """Class names for ``folders`` from a synset-mapping file: the first name of each folder's synset, cleaned.

    Names shared by several classes get `` (<wnid>)`` appended. With ``strict=False`` a file whose lines are not all
    synset-mapping lines gives None (it is in another format); with ``strict=True`` such a line is an error.

    Raises:
        PandError: a malformed line (strict), a synset listed twice, a class folder the file does not name.
    """
    lines = base.read_lines(path)
    if not strict and (not lines or not all(_SYNSET_LINE.match(line) for _, line in lines)):
        return None
    first_line: dict[str, int] = {}
    names: dict[str, str] = {}
    for no, line in lines:
        m = _SYNSET_LINE.match(line)
        if m is None:
            raise base.malformed(path, no, line, "'<wnid> <name>[, <synonym>...]', e.g. 'n01440764 tench, Tinca tinca'")
        wnid, synonyms = m.groups()
        seen = first_line.setdefault(wnid, no)
        if seen != no:
            raise ConfigError(f"line {no} of {path}: synset {wnid} is already listed at line {seen}")
        names[wnid] = base.clean_name(synonyms.split(",")[0])
    missing = [f for f in folders if f not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{path} gives no name for class folder {missing[0]!r}{more}")
    chosen = [names[f] for f in folders]
    count: dict[str, int] = {}
    for name in chosen:
        count[name.casefold()] = count.get(name.casefold(), 0) + 1
    return [f"{name} ({wnid})" if count[name.casefold()] > 1 else name for wnid, name in zip(folders, chosen)]


def class_names(d: Path, folders: Sequence[str], class_names_file: str | os.PathLike | None = None) -> list[str]:
    """Display names of ``folders`` (see the module docstring for the order of the sources)."""
    if class_names_file is not None:
        path = Path(class_names_file).expanduser()
        if not path.is_file():
            raise DatasetNotFoundError(f"class_names_file not found: {path}")
        names = read_synset_mapping(path, folders, strict=False)
        return names if names is not None else class_folders.read_class_names(path, list(folders))
    if (d / SYNSET_FILE).is_file():
        return read_synset_mapping(d / SYNSET_FILE, folders)  # type: ignore[return-value]
    return [base.clean_name(f) for f in folders]


def _check_same_folders(train_dir: Path, val_dir: Path, train: Sequence[str], val: Sequence[str]) -> None:
    """train/ and val/ hold the same class folders; else an error naming the first folder (sorted) that differs."""
    only_train, only_val = set(train) - set(val), set(val) - set(train)
    if not only_train and not only_val:
        return
    folder = min(only_train | only_val)
    here, there = (train_dir, val_dir) if folder in only_train else (val_dir, train_dir)
    n = len(only_train | only_val)
    more = f" ({n - 1} more class folder{'s differ' if n > 2 else ' differs'})" if n > 1 else ""
    raise ConfigError(
        f"class folder {here / folder} has no counterpart in {there}; train/ and val/ must hold the same class "
        f"folders{more}"
    )


@register_dataset("imagenet")
def load(
    root: str | os.PathLike, split: str, *, download: bool = False, class_names_file: str | os.PathLike | None = None
) -> base.FileDataset:
    """The official ``"train"`` split, or ``"test"``: the official val folder."""
    base.check_split(split, ("train", "test"))
    d = dataset_dir(root, download)
    train_dir = base.require(d / "train", TITLE, LAYOUT, download=False)
    val_dir = base.require(d / "val", TITLE, LAYOUT, download=False)
    folders = class_folders.subdirs(train_dir)
    if not folders:
        raise base.not_found(f"no class folders in {train_dir}", train_dir / "<wnid>", TITLE, LAYOUT, download=False)
    _check_same_folders(train_dir, val_dir, folders, class_folders.subdirs(val_dir))
    classes = class_names(d, folders, class_names_file)
    split_dir = SPLIT_DIRS[split]
    index = {f: i for i, f in enumerate(folders)}
    relpaths, targets = class_folders.list_images(d, split_dir, folders, index)
    if not relpaths:
        raise base.not_found(
            f"no images ({', '.join(base.IMAGE_EXTENSIONS)}) in {d / split_dir}",
            d / split_dir / "<wnid>" / "<image>.JPEG",
            TITLE,
            LAYOUT,
            download=False,
        )
    return base.FileDataset("imagenet", split, classes, d, relpaths, targets)
