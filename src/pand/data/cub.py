"""CUB-200-2011 (Caltech-UCSD Birds): 200 classes, 5,994 official train / 5,794 test images.

Official files: ``images/NNN.Class_Name/*.jpg``, ``images.txt`` (``id path``), ``image_class_labels.txt``
(``id class``, 1-based), ``train_test_split.txt`` (``id 1|0``, 1 = train) and ``classes.txt`` (``id NNN.Name``).
Class names drop the ``NNN.`` prefix and turn underscores into spaces. There is no official validation split.
"""

from __future__ import annotations

import os
from pathlib import Path

from pand.data import base
from pand.data.download import download_and_extract
from pand.errors import PandError

TITLE = "CUB-200-2011"
FOLDER = "CUB_200_2011"
HAS_OFFICIAL_VAL = False
MARKERS = ("images.txt", "classes.txt", "images")

# Where download=True fetches the data (tests monkeypatch the url to a file:// archive).
SOURCES: dict[str, dict] = {
    "archive": {
        "url": "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "md5": "97eceeb196236b17998738112f37df78",
        "filename": "CUB_200_2011.tgz",
    },
}

LAYOUT = """\
  <root>/CUB_200_2011/            (or pass the CUB_200_2011 folder itself as root)
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ...
    images.txt                    <image id> <relative path under images/>
    image_class_labels.txt        <image id> <class id, 1-based>
    train_test_split.txt          <image id> <1 = train, 0 = test>
    classes.txt                   <class id> <NNN.Class_Name>"""


def download(root: str | os.PathLike) -> None:
    src = SOURCES["archive"]
    download_and_extract(src["url"], Path(root).expanduser(), src["md5"], src.get("filename"), layout=LAYOUT)


def dataset_dir(root: str | os.PathLike, download_missing: bool = False) -> Path:
    return base.locate_dataset(root, FOLDER, MARKERS, TITLE, LAYOUT, download, download_missing)


def _id_table(path: Path, what: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for no, line in base.read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise base.malformed(path, no, line, f"'<id> <{what}>'")
        table[parts[0]] = parts[1].strip()
    return table


def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"`` or ``"test"`` split."""
    base.check_split(split, ("train", "test"))
    d = dataset_dir(root, download)
    req = lambda name: base.require(d / name, TITLE, LAYOUT, download=True)  # noqa: E731
    images = _id_table(req("images.txt"), "relative path")
    labels = _id_table(req("image_class_labels.txt"), "class id")
    is_train = _id_table(req("train_test_split.txt"), "1|0")
    classes_file = req("classes.txt")
    req("images")

    class_rows = []
    for no, line in base.read_lines(classes_file):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise base.malformed(classes_file, no, line, "'<class id> <NNN.Class_Name>'")
        class_rows.append((int(parts[0]), parts[1].strip()))
    class_rows.sort()
    if [cid for cid, _ in class_rows] != list(range(1, len(class_rows) + 1)):
        raise PandError(f"{classes_file}: class ids must be 1..{len(class_rows)} without gaps")
    classes = [base.clean_name(raw, strip_prefix=r"^\d+\.") for _, raw in class_rows]

    want = "1" if split == "train" else "0"
    relpaths, targets = [], []
    for image_id in images:  # file order (the official file is sorted by id)
        if image_id not in labels:
            raise PandError(f"image id {image_id} of {d / 'images.txt'} has no label in {d / 'image_class_labels.txt'}")
        if image_id not in is_train:
            raise PandError(f"image id {image_id} of {d / 'images.txt'} is missing from {d / 'train_test_split.txt'}")
        if is_train[image_id] not in ("0", "1"):
            raise PandError(f"{d / 'train_test_split.txt'}: image {image_id} has {is_train[image_id]!r}, not 1 or 0")
        if is_train[image_id] != want:
            continue
        label = labels[image_id]
        if not label.isdigit() or not 1 <= int(label) <= len(classes):
            raise PandError(
                f"{d / 'image_class_labels.txt'}: image {image_id} has class {label!r}, not 1..{len(classes)}"
            )
        relpaths.append("images/" + images[image_id].replace(os.sep, "/"))
        targets.append(int(label) - 1)
    base.check_files_exist(d, relpaths, d / "images.txt", TITLE)
    return base.FileDataset("cub", split, classes, d, relpaths, targets)
