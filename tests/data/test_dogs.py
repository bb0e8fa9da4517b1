"""Stanford Dogs: .mat lists read with scipy, WordNet ids stripped from class names."""

from __future__ import annotations

import shutil
from collections import Counter

from pand.data import get_dataset
from pand.data.dogs import read_list
from tests.fixtures.datasets import make_dogs


def test_mat_lists_and_names(tmp_path):
    d = make_dogs(tmp_path, n_classes=4, per_class=5, test_per_class=2)
    files, labels = read_list(d / "lists" / "test_list.mat")
    assert files[0] == "n02085620-Chihuahua/n02085620_105.jpg" and labels[:2] == [1, 1]
    test = get_dataset("dogs", tmp_path, "test")
    assert test.classes == ["Chihuahua", "Japanese spaniel", "Maltese dog", "Pekinese"]
    assert len(test) == 8 and Counter(test.targets) == {0: 2, 1: 2, 2: 2, 3: 2}
    for i in range(len(test)):
        assert test.sample_id(i).startswith("Images/")
        folder = test.sample_id(i).split("/")[1]
        assert test.classes[test.targets[i]] == folder.split("-", 1)[1].replace("_", " ")
    tr = get_dataset("dogs", tmp_path, "train", val_fraction=0.2)
    va = get_dataset("dogs", tmp_path, "val", val_fraction=0.2)
    assert len(tr) + len(va) == 20 and Counter(va.targets) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_flat_layout_in_root(tmp_path):
    # Images/ and lists/ directly in root, and the .mat files directly in the dataset folder
    d = make_dogs(tmp_path / "src")
    flat = tmp_path / "flat"
    shutil.copytree(d, flat)
    assert len(get_dataset("dogs", flat, "train", val_fraction=0.0)) == 9
    for f in (flat / "lists").iterdir():
        f.rename(flat / f.name)
    (flat / "lists").rmdir()
    assert len(get_dataset("dogs", flat, "test")) == 6
