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
from pand.data.registry import register_dataset
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


def _id_table(path: Path, what: str) -> dict[str, tuple[int, str]]:
    """image id -> (line number, value) of a two-column CUB list file; an id listed twice is an error."""
    table: dict[str, tuple[int, str]] = {}
    for no, line in base.read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise base.malformed(path, no, line, f"'<id> <{what}>'")
        if parts[0] in table:
            raise PandError(f"line {no} of {path}: image id {parts[0]} is already listed at line {table[parts[0]][0]}")
        table[parts[0]] = (no, parts[1].strip())
    return table


def _read_classes(path: Path) -> list[str]:
    """Class names in id order from classes.txt; ids must be 1..n, each id and each name listed once."""
    by_id: dict[int, tuple[int, str]] = {}  # class id -> (line number, clean name)
    by_name: dict[str, tuple[int, int]] = {}  # casefolded name -> (line number, class id)
    for no, line in base.read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise base.malformed(path, no, line, "'<class id> <NNN.Class_Name>'")
        cid, name = int(parts[0]), base.clean_name(parts[1].strip(), strip_prefix=r"^\d+\.")
        if cid in by_id:
            raise PandError(f"line {no} of {path}: class id {cid} is already listed at line {by_id[cid][0]}")
        # Two ids with one name would train two classes that CLIP prompts cannot tell apart.
        first = by_name.setdefault(name.casefold(), (no, cid))
        if first[1] != cid:
            raise PandError(
                f"line {no} of {path} ({line!r}): class name {name!r} is already class {first[1]} at line {first[0]}; "
                "every class must have its own name"
            )
        by_id[cid] = (no, name)
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        gap = next(c for c in range(1, len(by_id) + 2) if c not in by_id)
        raise PandError(f"{path}: class ids must be 1..{len(by_id)} without gaps; class id {gap} is missing")
    return [by_id[cid][1] for cid in range(1, len(by_id) + 1)]


def _check_labels(labels_file: Path, labels: dict[str, tuple[int, str]], classes_file: Path, n: int) -> None:
    """Every line of image_class_labels.txt (train and test alike) names a class of classes.txt."""
    for image_id, (no, label) in labels.items():
        if not label.isdigit() or not 1 <= int(label) <= n:
            raise PandError(
                f"line {no} of {labels_file}: image {image_id} has class {label!r}, but {classes_file} lists "
                f"classes 1..{n}"
            )


@register_dataset("cub")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.FileDataset:
    """The official ``"train"`` or ``"test"`` split."""
    base.check_split(split, ("train", "test"))
    d = base.dataset_dir(__name__, root, download)
    req = lambda name: base.require(d / name, TITLE, LAYOUT, download=True)  # noqa: E731
    images = _id_table(req("images.txt"), "relative path")
    labels = _id_table(req("image_class_labels.txt"), "class id")
    is_train = _id_table(req("train_test_split.txt"), "1|0")
    classes_file = req("classes.txt")
    req("images")

    classes = _read_classes(classes_file)
    _check_labels(d / "image_class_labels.txt", labels, classes_file, len(classes))

    want = "1" if split == "train" else "0"
    relpaths, targets = [], []
    for image_id, (line_no, rel) in images.items():  # file order (the official file is sorted by id)
        at = f"line {line_no} of {d / 'images.txt'}: image id {image_id}"
        if image_id not in labels:
            raise PandError(f"{at} has no label in {d / 'image_class_labels.txt'}")
        if image_id not in is_train:
            raise PandError(f"{at} is missing from {d / 'train_test_split.txt'}")
        no, flag = is_train[image_id]
        if flag not in ("0", "1"):
            raise PandError(f"line {no} of {d / 'train_test_split.txt'}: image {image_id} has {flag!r}, not 1 or 0")
        if flag != want:
            continue
        relpaths.append("images/" + rel.replace(os.sep, "/"))
        targets.append(int(labels[image_id][1]) - 1)
    base.check_files_exist(d, relpaths, d / "images.txt", TITLE)
    return base.FileDataset("cub", split, classes, d, relpaths, targets)
