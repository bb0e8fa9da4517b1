"""stratified_split, subset and the train/val carving done by get_dataset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pand.data import DATASET_NAMES, get_dataset, stratified_split, subset
from pand.errors import ConfigError
from tests.fixtures.datasets import make_cub, make_fashion_mnist


def test_stratified_split_counts_and_partition():
    targets = [0] * 10 + [1] * 20 + [2] * 5 + [3] * 2 + [4] * 1
    kept, held = stratified_split(targets, 0.1, seed=0)
    assert sorted(kept + held) == list(range(len(targets)))
    assert not set(kept) & set(held)
    assert kept == sorted(kept) and held == sorted(held)
    per_class = Counter(targets[i] for i in held)
    # round(0.1 * n), at least 1 for classes with >= 2 items, none for a singleton
    assert per_class == {0: 1, 1: 2, 2: 1, 3: 1}
    assert 4 not in per_class


def test_stratified_split_rounding_and_cap():
    targets = [0] * 25 + [1] * 3
    _, held = stratified_split(targets, 0.3, seed=1)
    held_c = Counter(targets[i] for i in held)
    assert held_c[0] == round(0.3 * 25) and held_c[1] == 1
    # never empties a class from the kept part
    targets = [0, 0, 1, 1]
    kept, _ = stratified_split(targets, 0.9, seed=0)
    assert Counter(targets[i] for i in kept) == {0: 1, 1: 1}


def test_stratified_split_deterministic_and_seeded():
    targets = np.repeat(np.arange(5), 40)
    a = stratified_split(targets, 0.25, seed=3)
    b = stratified_split(targets.tolist(), 0.25, seed=3)
    c = stratified_split(targets, 0.25, seed=4)
    assert a == b
    assert a[1] != c[1]
    assert len(a[1]) == len(c[1]) == 50


def test_stratified_split_zero_fraction_and_bad_fraction():
    kept, held = stratified_split([0, 1, 1, 2], 0.0, seed=0)
    assert held == [] and kept == [0, 1, 2, 3]
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError):
            stratified_split([0, 1], bad, seed=0)


def test_subset_restricts_everything(tmp_path):
    make_cub(tmp_path, n_classes=3, per_class=4, test_per_class=2)
    full = get_dataset("cub", tmp_path, "test")
    sub = subset(full, [4, 1])
    assert len(sub) == 2 and sub.name == "cub" and sub.split == "test" and sub.classes == full.classes
    assert sub.targets == [full.targets[4], full.targets[1]]
    assert sub.sample_id(0) == full.sample_id(4)
    assert np.array_equal(np.asarray(sub.load_image(1)), np.asarray(full.load_image(1)))
    assert sub[0][1] == full.targets[4]
    assert sub.fingerprint() != full.fingerprint()
    assert subset(full, range(len(full))).fingerprint() == full.fingerprint()
    with pytest.raises(IndexError):
        sub.load_image(2)
    with pytest.raises(IndexError):
        subset(full, [len(full)])


@pytest.mark.parametrize("name", ["cub", "fashion_mnist"])
def test_train_val_partition_official_train(tmp_path, name):
    if name == "cub":
        make_cub(tmp_path, n_classes=4, per_class=10, test_per_class=1)
        official = 40
    else:
        make_fashion_mnist(tmp_path, n_train=200, n_test=10)
        official = 200
    tr = get_dataset(name, tmp_path, "train", val_fraction=0.2, split_seed=0)
    va = get_dataset(name, tmp_path, "val", val_fraction=0.2, split_seed=0)
    ids_tr = {tr.sample_id(i) for i in range(len(tr))}
    ids_va = {va.sample_id(i) for i in range(len(va))}
    assert len(tr) + len(va) == official
    assert not ids_tr & ids_va
    assert len(ids_tr | ids_va) == official
    # stratified: every class has exactly round(0.2 * n_c) validation items
    n_classes = len(tr.classes)
    counts = Counter(va.targets)
    per_class = official // (4 if name == "cub" else 10)
    assert all(counts[c] == round(0.2 * per_class) for c in range(n_classes if name == "cub" else 10))
    assert va.split == "val" and tr.split == "train"
    # deterministic across calls, changes with the seed
    again = get_dataset(name, tmp_path, "val", val_fraction=0.2, split_seed=0)
    assert [again.sample_id(i) for i in range(len(again))] == [va.sample_id(i) for i in range(len(va))]
    other = get_dataset(name, tmp_path, "val", val_fraction=0.2, split_seed=1)
    assert {other.sample_id(i) for i in range(len(other))} != ids_va


def test_unknown_name_and_split(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ConfigError) as e:
        get_dataset("cifar", tmp_path, "train")
    for name in DATASET_NAMES:
        assert name in str(e.value)
    with pytest.raises(ConfigError) as e:
        get_dataset("cub", tmp_path, "trainval")
    assert "train" in str(e.value) and "val" in str(e.value) and "test" in str(e.value)


def test_transform_applied(tmp_path):
    make_cub(tmp_path)
    ds = get_dataset("cub", tmp_path, "train", transform=lambda im: im.size)
    assert ds[0] == ((32, 32), ds.targets[0])
    ds.transform = None
    img, _ = ds[0]
    assert img.mode == "RGB"
