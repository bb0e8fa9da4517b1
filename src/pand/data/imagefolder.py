"""Any dataset stored as one folder per class: ``root/train/<class>/*``, ``root/test/<class>/*``, optional ``root/val``.

Classes are the sub-folders of ``root/train`` in sorted order; images are files with a known image extension
(jpg, jpeg, png, bmp, webp, any case), searched recursively inside each class folder by :func:`pand.data.walk.walk`
(links followed once, none leading out of ``root`` or into another split's folder, each real file listed once in a
split). Every train class folder must hold an image, and a split folder holding image files of another type (gif,
tif, ...) is refused rather than silently left out. Display names are the folder names with underscores turned into
spaces (no prefix is stripped), unless a ``class_names_file`` is given: either one name per line in sorted-folder
order, or ``folder_name<TAB or comma>display name`` lines. When ``root/val`` exists it is the validation split;
otherwise ``val`` is carved from ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pand.data import base
from pand.data.folders import list_images, read_class_names, subdirs
from pand.data.registry import register_dataset
from pand.data.walk import check_input_root
from pand.errors import ConfigError

TITLE = "an image-folder dataset"

LAYOUT = """\
  <root>/
    train/<class_a>/img001.jpg, train/<class_b>/... (one folder per class; jpg jpeg png bmp webp)
    test/<class_a>/...             (same class folder names as train)
    val/<class_a>/...              (optional; else val is carved from train)"""


def has_official_val(root: str | os.PathLike) -> bool:
    return (Path(root).expanduser() / "val").is_dir()


@register_dataset("imagefolder")
def load(
    root: str | os.PathLike, split: str, *, download: bool = False, class_names_file: str | os.PathLike | None = None
) -> base.FileDataset:
    """The ``"train"``, ``"test"`` or (if the folder exists) ``"val"`` split."""
    base.check_split(split, ("train", "val", "test"))
    root = Path(root).expanduser()
    if download:
        raise ConfigError(
            "imagefolder datasets cannot be downloaded; set download=False and create the folders:\n" + LAYOUT
        )
    train_dir = root / "train"
    check_input_root(root, "data.root")
    if not train_dir.is_dir():
        raise base.not_found(f"image-folder dataset not found under {root}", train_dir, TITLE, LAYOUT, download=False)
    folders = subdirs(train_dir)
    if not folders:
        raise base.not_found(f"no class folders in {train_dir}", train_dir / "<class>", TITLE, LAYOUT, download=False)
    if class_names_file is not None:
        classes = read_class_names(class_names_file, folders)
    else:
        classes = [base.clean_name(f) for f in folders]

    split_dir = root / split
    if not split_dir.is_dir():
        raise base.not_found(f"image-folder split {split!r} not found", split_dir, TITLE, LAYOUT, download=False)
    index = {f: i for i, f in enumerate(folders)}
    split_folders = subdirs(split_dir)
    for folder in split_folders:
        if folder not in index:
            raise ConfigError(
                f"class folder {split_dir / folder} has no counterpart in {train_dir}; "
                f"every {split} class must also be a train class"
            )
    relpaths, targets = list_images(root, split, split_folders, index, classes=classes)
    if not relpaths:
        raise base.not_found(
            f"no images ({', '.join(base.IMAGE_EXTENSIONS)}) in {split_dir}",
            split_dir / "<class>" / "<image>.jpg",
            TITLE,
            LAYOUT,
            download=False,
        )
    return base.FileDataset("imagefolder", split, classes, root, relpaths, targets)
