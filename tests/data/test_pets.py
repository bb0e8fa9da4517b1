"""Oxford-IIIT Pet: labels from the CLASS-ID column, names from the file-name prefix."""

from __future__ import annotations

from collections import Counter

import pytest

from pand.data import get_dataset
from pand.errors import ConfigError, PandError
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


# -- annotations naming a class outside the official list -------------------------------------------------------------


def _line_no(path, startswith):
    return next(no for no, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(startswith))


@pytest.mark.parametrize("cid", [38, 0])
def test_class_id_outside_official_list(tmp_path, cid):
    d = make_pets(tmp_path, per_class=1, test_per_class=1)
    test_txt = d / "annotations" / "test.txt"
    test_txt.write_text(test_txt.read_text() + f"Extra_cat_1 {cid} 1 13\n")
    no = len(test_txt.read_text().splitlines())
    for split in ("train", "test"):  # the bad test line also stops loading train: both files define the classes
        with pytest.raises(PandError) as e:
            get_dataset("pets", tmp_path, split, num_classes=37)
        msg = str(e.value)
        assert f"line {no} of {test_txt}" in msg and f"'Extra_cat_1 {cid} 1 13'" in msg
        assert f"CLASS-ID {cid} is not an official" in msg and "1..37" in msg
        assert not isinstance(e.value, ConfigError) and "num_classes" not in msg


def test_one_class_id_with_two_breeds(tmp_path):
    d = make_pets(tmp_path, n_classes=3, per_class=1, test_per_class=1)
    test_txt = d / "annotations" / "test.txt"
    test_txt.write_text(test_txt.read_text() + "Bengal_9 1 1 2\n")  # CLASS-ID 1 is Abyssinian
    no = len(test_txt.read_text().splitlines())
    with pytest.raises(PandError) as e:
        get_dataset("pets", tmp_path, "test")
    msg = str(e.value)
    assert msg.startswith(f"line {no} of {test_txt} ('Bengal_9 1 1 2'): image 'Bengal_9' has CLASS-ID 1")
    assert f"'Abyssinian' at line 5 of {d / 'annotations' / 'trainval.txt'}" in msg


def test_two_class_ids_with_one_breed(tmp_path):
    # CLASS-ID 3's images renamed to CLASS-ID 2's breed: the class name would be listed twice
    d = make_pets(tmp_path, n_classes=3, per_class=2, test_per_class=1)
    for f in ("trainval.txt", "test.txt"):
        p = d / "annotations" / f
        p.write_text(p.read_text().replace("american_pit_bull_terrier", "american_bulldog"))
    trainval = d / "annotations" / "trainval.txt"
    first_3 = _line_no(trainval, "american_bulldog_1 3")
    first_2 = _line_no(trainval, "american_bulldog_1 2")
    with pytest.raises(PandError) as e:
        get_dataset("pets", tmp_path, "train")
    msg = str(e.value)
    assert msg.startswith(f"line {first_3} of {trainval} ('american_bulldog_1 3 2 2'): breed 'american_bulldog'")
    assert f"CLASS-ID 2 at line {first_2} of {trainval}" in msg and "listed twice" in msg
