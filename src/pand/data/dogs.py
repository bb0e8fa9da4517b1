"""Stanford Dogs: 120 breeds, 12,000 official train / 8,580 test images.

Official files: ``Images/n02085620-Chihuahua/*.jpg`` and ``lists/{train,test}_list.mat`` (MATLAB files with
``file_list``, a cell array of paths relative to ``Images/``, and ``labels``, 1-based), read with scipy. The ``.mat``
files are also accepted directly in the dataset folder (that is how ``lists.tar`` unpacks). Class names drop the
WordNet id and turn underscores into spaces (``n02085620-Chihuahua`` -> ``Chihuahua``). ``val`` is carved from train.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pand.data import base
from pand.data.download import download_and_extract
from pand.data.registry import register_dataset
from pand.errors import PandError

TITLE = "Stanford Dogs"
FOLDER = "stanford_dogs"
HAS_OFFICIAL_VAL = False
MARKERS = ("Images", "lists")
NUM_CLASSES = 120

# Where download=True fetches the data (tests monkeypatch the urls to file:// archives). ``dest`` is the sub-folder of
# the dataset folder the archive is extracted into (lists.tar holds the .mat files without a folder).
SOURCES: dict[str, dict] = {
    "images": {
        "url": "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
        "md5": "1bb1f2a596ae7057f99d7d75860002ef",
        "filename": "images.tar",
        "dest": ".",
    },
    "lists": {
        "url": "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
        "md5": "edbb9f16854ec66506b5f09b583e0656",
        "filename": "lists.tar",
        "dest": "lists",
    },
}

LAYOUT = """\
  <root>/stanford_dogs/           (or pass the folder holding Images/ and lists/ itself as root)
    Images/n02085620-Chihuahua/n02085620_10074.jpg ...
    lists/train_list.mat          file_list (paths relative to Images/), labels (1-based)
    lists/test_list.mat"""


def download(root: str | os.PathLike) -> None:
    dest = Path(root).expanduser() / FOLDER
    for src in SOURCES.values():
        download_and_extract(src["url"], dest / src.get("dest", "."), src["md5"], src.get("filename"), layout=LAYOUT)


def _list_file(d: Path, split: str) -> Path:
    name = f"{split}_list.mat"
    for cand in (d / "lists" / name, d / name):
        if cand.exists():
            return cand
    raise base.not_found(f"{TITLE} is incomplete", d / "lists" / name, TITLE, LAYOUT, download=True)


def _cell_str(cell) -> str:
    """A MATLAB string as loadmat returns it (a 1-element char array, possibly nested) -> str."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            if cell.dtype.kind in "US" and cell.ndim == 1:  # char matrix row
                return "".join(str(c) for c in cell)
            raise ValueError(f"expected a single string, got array of shape {cell.shape}")
        cell = cell.reshape(-1)[0]
    return str(cell)


def read_list(path: Path) -> tuple[list[str], list[int]]:
    """(paths relative to Images/, 1-based labels) from a Stanford Dogs ``*_list.mat``."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises assorted errors for bad files
        raise PandError(f"cannot read {path} as a MATLAB file: {e}") from e
    for key in ("file_list", "labels"):
        if key not in mat:
            raise PandError(
                f"{path} has no {key!r} variable (found: {sorted(k for k in mat if not k.startswith('__'))})"
            )
    try:
        files = [_cell_str(c).replace("\\", "/") for c in np.asarray(mat["file_list"], dtype=object).reshape(-1)]
        labels = [int(v) for v in np.asarray(mat["labels"]).reshape(-1)]
    except (ValueError, TypeError) as e:
        raise PandError(f"cannot parse file_list/labels in {path}: {e}") from e
    if len(files) != len(labels):
        raise PandError(f"{path}: {len(files)} entries in file_list but {len(labels)} labels")
    return files, labels


def _entry(path: Path, i: int, file: str, label: int) -> str:
    # Index from 0 as scipy.io.loadmat shows it (MATLAB counts from 1).
    return f"entry {i} of {path} (file_list {file!r}, label {label})"


def _class_folders(lists: dict[str, Path], parsed: dict[str, tuple[list[str], list[int]]]) -> dict[int, str]:
    """label -> the Images/ sub-folder all its images are in; over train and test so both agree.

    A label outside the official 1..120, or two labels sharing a folder (one breed listed as two classes), or one
    label spread over two folders is an error naming the .mat file and the entry.
    """
    first_of_label: dict[int, tuple[str, str]] = {}  # label -> (folder, where)
    first_of_folder: dict[str, tuple[int, str]] = {}  # folder -> (label, where)
    for s in ("train", "test"):
        for i, (f, label) in enumerate(zip(*parsed[s], strict=True)):
            where = _entry(lists[s], i, f, label)
            if not 1 <= label <= NUM_CLASSES:
                raise PandError(
                    f"{where}: label {label} is not a Stanford Dogs class; the official labels are 1..{NUM_CLASSES}"
                )
            folder = f.split("/", 1)[0]
            known_folder, at = first_of_label.setdefault(label, (folder, where))
            if known_folder != folder:
                raise PandError(f"{where}: label {label} is used for both {known_folder!r} (at {at}) and {folder!r}")
            known_label, at = first_of_folder.setdefault(folder, (label, where))
            if known_label != label:
                raise PandError(
                    f"{where}: breed folder {folder!r} has label {label}, but label {known_label} at {at}; "
                    "each breed must have exactly one label (the class name would be listed twice)"
                )
    return {label: folder for label, (folder, _) in first_of_label.items()}


@register_dataset("dogs")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"`` or ``"test"`` split."""
    base.check_split(split, ("train", "test"))
    d = base.dataset_dir(__name__, root, download)
    base.require(d / "Images", TITLE, LAYOUT, download=True)
    lists = {s: _list_file(d, s) for s in ("train", "test")}
    parsed = {s: read_list(p) for s, p in lists.items()}

    folder_of = _class_folders(lists, parsed)
    n = max(folder_of, default=0)  # tiny copies may use fewer breeds, but always 1..n
    missing = [lab for lab in range(1, n + 1) if lab not in folder_of]
    if missing:
        raise PandError(
            f"label {missing[0]} has no image in {lists['train']} or {lists['test']}; labels must be 1..{n}"
        )
    classes = [base.clean_name(folder_of[lab], strip_prefix=r"^n\d+-") for lab in range(1, n + 1)]

    files, labels = parsed[split]
    relpaths = [f"Images/{f}" for f in files]
    base.check_files_exist(d, relpaths, lists[split], TITLE)
    return base.FileDataset("dogs", split, classes, d, relpaths, [lab - 1 for lab in labels])
