"""Oxford-IIIT Pet: labels from the CLASS-ID column, names from the file-name prefix."""

from __future__ import annotations

from collections import Counter

from pand.data import get_dataset
from tests.fixtures.datasets import PETS_BREEDS, make_pets


def test_37_classes_from_class_id(tmp_path):
    make_pets(tmp_path, per_class=2, test_per_class=1)
    test = get_dataset("pets", tmp_path, "test")
    assert len(test.classes) == 37
    assert test.classes[:3] == ["Abyssinian", "american bulldog", "american pit bull terrier"]
    assert test.classes == [b.replace("_", " ") for b in PETS_BREEDS]
    bulldog, pitbull = test.classes.index("american bulldog"), test.classes.index("american pit bull terrier")
    assert bulldog != pitbull
    # every image's label is its breed (file-name prefix), and both american_* classes have their own images
    for i in range(len(test)):
        stem = test.sample_id(i).split("/")[-1][:-4]
        assert test.classes[test.targets[i]] == stem.rsplit("_", 1)[0].replace("_", " ")
    assert Counter(test.targets)[bulldog] == 1 and Counter(test.targets)[pitbull] == 1
    assert len(test) == 37


def test_trainval_is_train_plus_val(tmp_path):
    make_pets(tmp_path, per_class=4, test_per_class=1)
    tr = get_dataset("pets", tmp_path, "train", val_fraction=0.25)
    va = get_dataset("pets", tmp_path, "val", val_fraction=0.25)
    assert len(tr) + len(va) == 37 * 4
    assert Counter(va.targets) == {c: 1 for c in range(37)}
    assert tr.classes == va.classes and len(tr.classes) == 37


def test_breed_id_column_is_ignored(tmp_path):
    # BREED-ID restarts per species (cat 1 and dog 1 share it); labels must still differ
    make_pets(tmp_path, n_classes=3, per_class=1, test_per_class=1)
    ds = get_dataset("pets", tmp_path, "test", num_classes=3)
    assert sorted(ds.targets) == [0, 1, 2]
