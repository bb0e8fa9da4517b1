"""Images shared by two splits, found by content: refused where the user's own folders make a val or test image a
training image, logged for a published dataset's own splits, remembered per dataset so a rerun reads no file."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

import pand.data.overlap as overlap
from pand.data import get_dataset
from pand.data.base import ArrayDataset
from pand.data.overlap import check_overlap, compared_pairs, item_digests
from pand.data.assembly import load_splits
from pand.engine.data import PandDataModule
from pand.errors import ConfigError
from tests.fixtures import datasets as fx


def _data(name, root, **over):
    return {"name": name, "root": str(root), "val_fraction": 0.2, "split_seed": 0, "verify_images": False, **over}


ALL_ZERO = {"train/val": 0, "train/test": 0, "val/test": 0}


@pytest.mark.parametrize(("name", "make"), [
    ("cub", lambda p: fx.make_cub(p)),
    ("aircraft", lambda p: fx.make_aircraft(p)),
    ("pets", lambda p: fx.make_pets(p, n_classes=4)),
    ("dogs", lambda p: fx.make_dogs(p)),
    ("fashion_mnist", lambda p: fx.make_fashion_mnist(p)),
    ("cifar100", lambda p: fx.make_cifar100(p)),
    ("imagenet", lambda p: fx.make_imagenet(p)),
    ("imagefolder", lambda p: fx.make_imagefolder(p, val_per_class=1)),
])
def test_the_real_layout_fixtures_share_no_image_between_splits(tmp_path, name, make):
    root = make(tmp_path / "data")
    found: dict[str, int] = {}
    load_splits(_data(name, root), overlap=found)
    assert found == ALL_ZERO


def test_a_test_image_copied_into_an_image_folders_training_class_is_refused(tmp_path):
    fx.make_imagefolder(tmp_path, per_class=3, test_per_class=2)
    test_file = tmp_path / "test" / "red_square" / "red_square_001.jpg"
    copy = tmp_path / "train" / "red_square" / "zz_copy.jpg"
    shutil.copyfile(test_file, copy)
    with pytest.raises(ConfigError) as e:
        load_splits(_data("imagefolder", tmp_path, val_fraction=0.0))
    assert str(e.value) == (
        f"1 train image is also a test image (the same bytes): {copy} = {test_file}: a val or test image must never be "
        "trained on. Remove the duplicates, or set data.allow_overlap=true to run anyway (the run summary records the "
        "overlap)")
    found: dict[str, int] = {}
    load_splits(_data("imagefolder", tmp_path, val_fraction=0.0, allow_overlap=True), overlap=found)
    assert found["train/test"] == 1


def test_the_message_names_a_few_pairs_and_counts_them_all(tmp_path):
    fx.make_imagefolder(tmp_path, per_class=2, test_per_class=3)
    tests = sorted((tmp_path / "test").rglob("*.jpg"))
    for i, f in enumerate(tests):
        (tmp_path / "val" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, tmp_path / "val" / f.parent.name / f"v{i}.jpg")
    with pytest.raises(ConfigError) as e:
        load_splits(_data("imagefolder", tmp_path))
    text = str(e.value)
    assert text.startswith("9 val images are also test images (the same bytes): ") and " and 6 more: " in text
    assert text.count(" = ") == 3 and "\n" not in text


def test_the_dataset_images_as_unlabelled_images_are_refused(tmp_path):
    d = fx.make_cub(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"^3 unlabelled images are also val images .*; 6 unlabelled images are also "
                                          r"test images .*data.allow_overlap=true"):
        load_splits(_data("cub", d, unlabelled=str(d / "images")))
    # rest: the official training images outside the pool, never a test image
    found: dict[str, int] = {}
    load_splits(_data("cub", d, samples_per_class=2, unlabelled="rest"), overlap=found)
    assert found == {**ALL_ZERO, "unlabelled/val": 0, "unlabelled/test": 0}


def test_duplicates_within_a_published_datasets_splits_are_logged_not_refused(tmp_path, caplog):
    d = fx.make_cub(tmp_path / "data")
    splits = load_splits(_data("cub", d))
    train_file, test_file = splits["train"].parent.path(0), splits["test"].path(0)
    shutil.copyfile(test_file, train_file)
    found: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="pand"):
        load_splits(_data("cub", d), overlap=found)
    assert found["train/test"] == 1
    assert f"1 train image is also a test image (the same bytes): {train_file} = {test_file} (duplicates within a " \
           "published dataset's own splits" in caplog.text


def test_array_datasets_compare_pixels_and_report_official_duplicates_as_a_count(tmp_path, caplog):
    train_images, train_labels = fx.fashion_mnist_arrays(60, seed=1)
    test_images, test_labels = fx.fashion_mnist_arrays(20, seed=2)
    train_images[7] = test_images[5]  # one training image repeated in the test set, as in the first release
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        fx.write_idx(tmp_path / fx.FASHION_MNIST_FILES[split][0], images)
        fx.write_idx(tmp_path / fx.FASHION_MNIST_FILES[split][1], labels)
    found: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="pand"):
        load_splits(_data("fashion_mnist", tmp_path, val_fraction=0.0), overlap=found)
    assert found["train/test"] == 1
    assert "1 train image is also a test image (the same bytes): fashion_mnist train image train/7 = fashion_mnist " \
           "test image test/5 (duplicates within a published dataset's own splits" in caplog.text


def test_a_carved_val_that_repeats_a_training_image_is_logged(tmp_path, caplog):
    fx.make_imagefolder(tmp_path, per_class=5, test_per_class=1)
    a = tmp_path / "train" / "red_square"
    for f in sorted(a.iterdir())[1:]:
        shutil.copyfile(sorted(a.iterdir())[0], f)  # the same photo five times in one class folder
    found: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="pand"):
        load_splits(_data("imagefolder", tmp_path), overlap=found)
    assert found["train/val"] == 4
    assert "4 train images are also val images (the same bytes): " in caplog.text
    assert "(the same image twice in the one split both were drawn from: kept)" in caplog.text


def test_unlabelled_and_labelled_training_images_may_be_the_same(tmp_path):
    d = fx.make_cub(tmp_path / "data")
    photos = tmp_path / "photos"
    photos.mkdir()
    train = load_splits(_data("cub", d))["train"]
    for i in range(3):
        shutil.copyfile(train.parent.path(train.indices[i]), photos / f"{i}.jpg")
    found: dict[str, int] = {}
    load_splits(_data("cub", d, unlabelled=str(photos)), overlap=found)
    assert "unlabelled/train" not in found and found["unlabelled/test"] == 0
    assert ("unlabelled", "train") not in compared_pairs(["train", "val", "test", "unlabelled", "test_novel"])
    assert ("unlabelled", "test_novel") in compared_pairs(["train", "val", "test", "unlabelled", "test_novel"])


def test_the_data_module_keeps_the_record_for_the_summary(tmp_path):
    fx.make_imagefolder(tmp_path, per_class=3, test_per_class=2)
    red = "red_square"
    shutil.copyfile(tmp_path / "test" / red / "red_square_000.jpg", tmp_path / "train" / red / "c.jpg")
    cfg = _data("imagefolder", tmp_path, allow_overlap=True, image_size=32, resize_size=36, mean=[0.5] * 3,
                std=[0.5] * 3, batch_size=2)
    module = PandDataModule(cfg)
    assert module.overlap == {}
    module.setup()
    assert module.overlap["train/test"] + module.overlap["val/test"] == 1


# -- digests and their memo ------------------------------------------------------------------------------------------


def test_digests_are_the_sha256_of_the_file_or_of_the_pixels(tmp_path):
    import hashlib

    fx.make_imagefolder(tmp_path, per_class=1, test_per_class=1)
    ds = get_dataset("imagefolder", tmp_path, "test")
    kind, digests = item_digests(ds, memo_dir=tmp_path / "memo")
    assert kind == "file" and digests[0] == hashlib.sha256(ds.path(0).read_bytes()).digest()
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    arrays = ArrayDataset("toy", "train", ["a"], images, [0, 0])
    kind, digests = item_digests(arrays)
    assert kind == "pixels" and digests[0] != digests[1]
    # the shape is part of the digest: the same bytes as another shape are another image
    flat = ArrayDataset("toy", "train", ["a"], images.reshape(2, 2, 8), [0, 0])
    assert item_digests(flat)[1][0] != digests[0]


def test_a_rerun_reads_no_file_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    fx.make_imagefolder(tmp_path / "d", per_class=2, test_per_class=1)
    ds = get_dataset("imagefolder", tmp_path / "d", "train", val_fraction=0.0)
    memo = tmp_path / "memo"
    first = item_digests(ds, memo_dir=memo)
    assert len(list(memo.glob("*.npz"))) == 1

    def refuse(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(overlap, "_sha256", refuse)
    assert item_digests(ds, memo_dir=memo) == first
    monkeypatch.undo()
    # the same size, new content: the fingerprint cannot tell, the modification time does
    path = ds.parent.path(ds.indices[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    read = []
    original = overlap._sha256
    monkeypatch.setattr(overlap, "_sha256", lambda p: read.append(p) or original(p))
    again = item_digests(ds, memo_dir=memo)
    assert read == [path] and again[1][0] != first[1][0] and again[1][1:] == first[1][1:]


def test_a_damaged_memo_is_ignored(tmp_path):
    fx.make_imagefolder(tmp_path / "d", per_class=1, test_per_class=1)
    ds = get_dataset("imagefolder", tmp_path / "d", "test")
    memo = tmp_path / "memo"
    first = item_digests(ds, memo_dir=memo)
    for f in memo.glob("*.npz"):
        f.write_bytes(b"not a memo")
    assert item_digests(ds, memo_dir=memo) == first


def test_the_memo_sits_next_to_the_verification_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("PAND_CACHE_DIR", str(tmp_path / "cache"))
    assert overlap.digest_memo_dir() == tmp_path / "cache" / "content-digests"
    fx.make_imagefolder(tmp_path / "d", per_class=1, test_per_class=1)
    check_overlap({"test": get_dataset("imagefolder", tmp_path / "d", "test"),
                   "val": get_dataset("imagefolder", tmp_path / "d", "train", val_fraction=0.0)})
    assert list((tmp_path / "cache" / "content-digests").glob("*.npz"))


def test_an_item_kind_without_digests_is_left_out(tmp_path):
    from pand.data.base import ClassificationDataset

    class Generated(ClassificationDataset):  # e.g. images made on the fly: no file, no array to digest
        def __init__(self):
            super().__init__("gen", "train", ["a"], [0, 0])

    fx.make_imagefolder(tmp_path, per_class=1, test_per_class=1)
    assert item_digests(Generated()) is None
    assert check_overlap({"train": Generated(), "test": get_dataset("imagefolder", tmp_path, "test")}) == {}
