"""CUB-200-2011 from its official list files."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from pand.data import ClassificationDataset, get_dataset
from pand.errors import ConfigError, PandError
from tests.fixtures.datasets import class_color, make_cub


@pytest.fixture
def cub_root(tmp_path):
    make_cub(tmp_path, n_classes=3, per_class=4, test_per_class=2)
    return tmp_path


def test_classes_labels_and_sizes(cub_root):
    test = get_dataset("cub", cub_root, "test")
    assert isinstance(test, ClassificationDataset)
    assert test.name == "cub" and test.split == "test"
    assert test.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert len(test) == 6 and Counter(test.targets) == {0: 2, 1: 2, 2: 2}
    # label matches the class folder of every image
    for i in range(len(test)):
        folder = test.sample_id(i).split("/")[1]
        assert int(folder[:3]) - 1 == test.targets[i]
    tr = get_dataset("cub", cub_root, "train", val_fraction=0.25)
    va = get_dataset("cub", cub_root, "val", val_fraction=0.25)
    assert len(tr) + len(va) == 12 and Counter(va.targets) == {0: 1, 1: 1, 2: 1}
    assert not {tr.sample_id(i) for i in range(len(tr))} & {test.sample_id(i) for i in range(len(test))}


def test_image_content_and_root_is_dataset_folder(cub_root):
    ds = get_dataset("cub", cub_root / "CUB_200_2011", "test")
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (32, 32)
    mean = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
    assert np.abs(mean - np.array(class_color(label, 3))).max() < 20


def test_num_classes_mismatch(cub_root):
    assert len(get_dataset("cub", cub_root, "test", num_classes=3).classes) == 3
    with pytest.raises(ConfigError) as e:
        get_dataset("cub", cub_root, "test", num_classes=200)
    msg = str(e.value)
    assert "200" in msg and "3" in msg and str(cub_root / "CUB_200_2011") in msg


def test_grey_image_converted_to_rgb(cub_root):
    from PIL import Image

    ds = get_dataset("cub", cub_root, "test")
    Image.new("L", (20, 10), 128).save(ds.root / ds.sample_id(0))
    img = ds.load_image(0)
    assert img.mode == "RGB" and img.size == (20, 10)


# -- annotations naming a class outside classes.txt -------------------------------------------------------------------


def _set_line(path, no, text):
    lines = path.read_text().splitlines()
    lines[no - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_label_not_in_classes_txt_names_the_line(cub_root):
    d = cub_root / "CUB_200_2011"
    labels = d / "image_class_labels.txt"
    _set_line(labels, 5, "5 4")  # image 5 is a train image; only classes 1..3 exist
    for split in ("train", "test"):  # every line is checked, whichever split is loaded
        with pytest.raises(PandError) as e:
            get_dataset("cub", cub_root, split)
        assert str(e.value) == (
            f"line 5 of {labels}: image 5 has class '4', but {d / 'classes.txt'} lists classes 1..3"
        )


def test_duplicated_class_name_in_classes_txt(cub_root):
    d = cub_root / "CUB_200_2011"
    classes = d / "classes.txt"
    _set_line(classes, 3, "3 003.laysan_albatross")  # class 2 is 002.Laysan_Albatross
    with pytest.raises(PandError) as e:
        get_dataset("cub", cub_root, "test")
    assert str(e.value) == (
        f"line 3 of {classes} ('3 003.laysan_albatross'): class name 'laysan albatross' is already class 2 at "
        "line 2; every class must have its own name"
    )
    _set_line(classes, 3, "2 003.Sooty_Albatross")
    with pytest.raises(PandError, match=re.escape(f"line 3 of {classes}: class id 2 is already listed at line 2")):
        get_dataset("cub", cub_root, "test")


def test_image_id_listed_twice(cub_root):
    split_file = cub_root / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text(split_file.read_text() + "4 0\n")
    n = len(split_file.read_text().splitlines())
    msg = f"line {n} of {split_file}: image id 4 is already listed at line 4"
    with pytest.raises(PandError, match=re.escape(msg)):
        get_dataset("cub", cub_root, "test")
