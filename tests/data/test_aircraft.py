"""FGVC-Aircraft 2013b: variants.txt classes, official train / val / test lists."""

from __future__ import annotations

from collections import Counter

import pytest

from pand.data import get_dataset
from pand.errors import PandError
from tests.fixtures.datasets import make_aircraft


def test_official_splits_and_variant_names(tmp_path):
    make_aircraft(tmp_path, n_classes=4, per_class=3, val_per_class=2, test_per_class=1)
    sets = {s: get_dataset("aircraft", tmp_path, s) for s in ("train", "val", "test")}
    assert sets["train"].classes == ["707-320", "A300B4", "F/A-18", "Falcon 2000"]
    assert {s: len(d) for s, d in sets.items()} == {"train": 12, "val": 8, "test": 4}
    assert Counter(sets["val"].targets) == {0: 2, 1: 2, 2: 2, 3: 2}
    ids = {s: {d.sample_id(i) for i in range(len(d))} for s, d in sets.items()}
    assert not ids["train"] & ids["val"] and not ids["val"] & ids["test"] and not ids["train"] & ids["test"]
    # val is the official list: independent of val_fraction / split_seed
    other = get_dataset("aircraft", tmp_path, "val", val_fraction=0.5, split_seed=9)
    assert [other.sample_id(i) for i in range(len(other))] == [sets["val"].sample_id(i) for i in range(8)]
    # the label of each image is the variant on its line
    lines = dict(
        line.split(" ", 1)
        for line in (tmp_path / "fgvc-aircraft-2013b/data/images_variant_val.txt").read_text().splitlines()
    )
    ds = sets["val"]
    for i in range(len(ds)):
        image_id = ds.sample_id(i).rsplit("/", 1)[1][:-4]
        assert ds.classes[ds.targets[i]] == lines[image_id]
    assert ds.load_image(0).mode == "RGB"


def test_dataset_folder_as_root(tmp_path):
    d = make_aircraft(tmp_path)
    assert len(get_dataset("aircraft", d, "test")) == 6


def test_variant_listed_twice_names_both_lines(tmp_path):
    d = make_aircraft(tmp_path, n_classes=3)
    variants = d / "data" / "variants.txt"
    variants.write_text(variants.read_text() + "A300B4\n")  # line 4; A300B4 is line 2
    with pytest.raises(PandError) as e:
        get_dataset("aircraft", tmp_path, "test")
    assert str(e.value) == f"line 4 of {variants}: variant 'A300B4' is already listed at line 2"


def test_unknown_variant_names_file_and_line(tmp_path):
    d = make_aircraft(tmp_path, n_classes=3)
    listing = d / "data" / "images_variant_val.txt"
    listing.write_text(listing.read_text() + "1234567 Boeing 797\n")
    n = len(listing.read_text().splitlines())
    with pytest.raises(PandError) as e:
        get_dataset("aircraft", tmp_path, "val")
    assert str(e.value) == f"line {n} of {listing}: variant 'Boeing 797' is not listed in {d / 'data' / 'variants.txt'}"
