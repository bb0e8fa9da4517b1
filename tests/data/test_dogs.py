"""Stanford Dogs: .mat lists read with scipy, WordNet ids stripped from class names."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from pand.data import get_dataset
from pand.data.dogs import read_list
from pand.errors import PandError
from tests.fixtures.datasets import _save_dogs_list, make_dogs


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


# -- labels outside the official list ---------------------------------------------------------------------------------


def _relabel(mat, changes, rename=None):
    """Rewrite a *_list.mat with some labels changed ({entry: label}) and folders renamed ({old: new})."""
    files, labels = read_list(mat)
    for i, label in changes.items():
        labels[i] = label
    for old, new in (rename or {}).items():
        files = [f.replace(old, new) for f in files]
    _save_dogs_list(mat, files, labels)
    return files


@pytest.mark.parametrize("label", [121, 0])
def test_label_outside_official_list(tmp_path, label):
    d = make_dogs(tmp_path, n_classes=3, per_class=3, test_per_class=2)
    mat = d / "lists" / "test_list.mat"
    files = _relabel(mat, {3: label})
    for split in ("train", "test"):
        with pytest.raises(PandError) as e:
            get_dataset("dogs", tmp_path, split, num_classes=120)
        msg = str(e.value)
        assert msg.startswith(f"entry 3 of {mat} (file_list {files[3]!r}, label {label}): label {label} is not a")
        assert "the official labels are 1..120" in msg and "num_classes" not in msg


def test_one_label_with_two_folders(tmp_path):
    d = make_dogs(tmp_path, n_classes=3, per_class=3, test_per_class=2)
    mat = d / "lists" / "test_list.mat"
    files = _relabel(mat, {0: 2})  # a Chihuahua image labelled as the Japanese spaniel
    with pytest.raises(PandError) as e:
        get_dataset("dogs", tmp_path, "test")
    msg = str(e.value)
    assert msg.startswith(f"entry 0 of {mat} (file_list {files[0]!r}, label 2): label 2 is used for both ")
    assert f"'n02085782-Japanese_spaniel' (at entry 3 of {d / 'lists' / 'train_list.mat'}" in msg


def test_two_labels_with_one_folder(tmp_path):
    # every Maltese image moved into the Chihuahua folder: label 3 would become a second "Chihuahua" class
    d = make_dogs(tmp_path, n_classes=3, per_class=3, test_per_class=2)
    train_mat = d / "lists" / "train_list.mat"
    for s in ("train", "test"):
        _relabel(d / "lists" / f"{s}_list.mat", {}, {"n02085936-Maltese_dog/": "n02085620-Chihuahua/"})
    with pytest.raises(PandError) as e:
        get_dataset("dogs", tmp_path, "train")
    msg = str(e.value)
    assert msg.startswith(f"entry 6 of {train_mat} (file_list 'n02085620-Chihuahua/n02085936_100.jpg', label 3)")
    assert "breed folder 'n02085620-Chihuahua' has label 3, but label 1 at entry 0 of" in msg
    assert "listed twice" in msg
