"""verify_images / verify_splits: every image decodes before training; clean splits are remembered by fingerprint."""

from __future__ import annotations

import json
import logging

import PIL.Image
import pytest

from pand.data import get_dataset, subset, verify_images, verify_splits
from pand.data import verify as verify_mod
from pand.errors import CorruptImageError, DatasetNotFoundError
from tests.fixtures.datasets import make_cub, make_fashion_mnist


def _splits(root, **kw):
    return {s: get_dataset("cub", root, s, **kw) for s in ("train", "val", "test")}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.fixture
def cub(tmp_path):
    make_cub(tmp_path / "data", n_classes=3, per_class=4, test_per_class=2)
    return tmp_path / "data"


@pytest.fixture
def count_opens(monkeypatch):
    """A list that grows by one path per PIL.Image.open call."""
    opened = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return opened


def _no_open(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(PIL.Image, "open", boom)


def test_corrupt_test_images_found_before_training(cub, tmp_path):
    test = get_dataset("cub", cub, "test")
    truncated, garbage = sorted(test.root / test.sample_id(i) for i in (1, 4))
    _truncate(truncated)
    garbage.write_bytes(b"this is not an image at all")
    memo = tmp_path / "memo"
    with pytest.raises(CorruptImageError) as e:
        verify_splits(_splits(cub), memo_dir=memo, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"2 images of cub/test cannot be decoded: {truncated} (")
    assert f"; and 1 more: {garbage} (cannot identify image file" in msg
    assert "truncated" in msg.lower() and "Replace or remove them" in msg
    # the clean splits are remembered, the bad one is not
    records = [json.loads(p.read_text()) for p in memo.glob("*.json")]
    assert sorted(r["split"] for r in records) == ["train", "val"]


def test_clean_dataset_is_remembered(cub, tmp_path, monkeypatch, count_opens):
    memo = tmp_path / "memo"
    test = get_dataset("cub", cub, "test")
    verify_images(test, memo_dir=memo, progress=False)
    assert len(count_opens) == len(test) == 6  # one open (and one decode) per file
    marker = memo / f"{test.fingerprint()}.json"
    record = json.loads(marker.read_text())
    assert (record["name"], record["split"], record["n"]) == ("cub", "test", 6) and "time" in record

    _no_open(monkeypatch)  # a second run, even with a fresh dataset object, opens nothing
    verify_images(get_dataset("cub", cub, "test"), memo_dir=memo, progress=False)
    verify_splits({"test": get_dataset("cub", cub, "test")}, memo_dir=memo)


def test_changed_file_size_verifies_again(cub, tmp_path, count_opens):
    memo = tmp_path / "memo"
    test = get_dataset("cub", cub, "test")
    verify_images(test, memo_dir=memo, progress=False)
    path = test.root / test.sample_id(0)
    path.write_bytes(path.read_bytes() + b"\0")  # still a valid JPEG, but the size (and fingerprint) changed
    changed = get_dataset("cub", cub, "test")
    assert changed.fingerprint() != test.fingerprint()
    count_opens.clear()
    verify_images(changed, memo_dir=memo, progress=False)
    assert len(count_opens) == 6 and len(list(memo.glob("*.json"))) == 2

    path.write_bytes(b"garbage")  # replaced by a broken file: the memo of the good file does not hide it
    with pytest.raises(CorruptImageError, match=str(path)):
        verify_images(get_dataset("cub", cub, "test"), memo_dir=memo, progress=False)


def test_unwritable_memo_dir_still_verifies(cub, tmp_path, caplog):
    not_a_folder = tmp_path / "memo-is-a-file"
    not_a_folder.write_text("x")
    test = get_dataset("cub", cub, "test")
    with caplog.at_level(logging.WARNING, logger="pand"):
        verify_images(test, memo_dir=not_a_folder, progress=False)
        verify_images(test, memo_dir=not_a_folder, progress=False)  # nothing remembered, checked again, no crash
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and str(not_a_folder) in warnings[0].getMessage()
    assert not_a_folder.read_text() == "x"
    # corrupt files are still reported with an unusable memo folder
    _truncate(test.root / test.sample_id(0))
    with pytest.raises(CorruptImageError):
        verify_images(get_dataset("cub", cub, "test"), memo_dir=not_a_folder, progress=False)


def test_default_memo_dir_from_env(cub, tmp_path, monkeypatch):
    monkeypatch.setenv("PAND_CACHE_DIR", str(tmp_path / "cache"))
    assert verify_mod.default_memo_dir() == tmp_path / "cache" / "verified-images"
    test = get_dataset("cub", cub, "test")
    verify_images(test, progress=False)
    assert (tmp_path / "cache" / "verified-images" / f"{test.fingerprint()}.json").is_file()
    monkeypatch.setenv("PAND_CACHE_DIR", str(tmp_path / "cache" / "verified-images" / f"{test.fingerprint()}.json"))
    verify_images(get_dataset("cub", cub, "train"), progress=False)  # cache "folder" is a file: warns, no crash


def test_array_dataset_needs_no_work(tmp_path, monkeypatch):
    from pand.data import fashion_mnist
    from pand.data.base import ArrayDataset

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")
    make_fashion_mnist(tmp_path / "fm")
    splits = {s: get_dataset("fashion_mnist", tmp_path / "fm", s) for s in ("train", "val", "test")}
    _no_open(monkeypatch)
    monkeypatch.setattr(ArrayDataset, "fingerprint", lambda self: pytest.fail("fingerprint computed"))
    verify_images(splits["test"], memo_dir=tmp_path / "memo")
    verify_splits(splits, memo_dir=tmp_path / "memo")  # val is a subset of an ArrayDataset
    assert not (tmp_path / "memo").exists()


def test_subset_checks_only_its_items(cub, tmp_path):
    train = get_dataset("cub", cub, "train", val_fraction=0.25)
    val = get_dataset("cub", cub, "val", val_fraction=0.25)
    bad = train.root / train.sample_id(0)
    _truncate(bad)
    verify_images(val, memo_dir=tmp_path / "memo", progress=False)  # the bad file is not in val
    with pytest.raises(CorruptImageError) as e:
        verify_images(train, memo_dir=tmp_path / "memo", progress=False)
    assert str(e.value).startswith(f"1 image of cub/train cannot be decoded: {bad} (")


def test_same_fingerprint_verified_once_per_call(cub, tmp_path, count_opens):
    no_memo = tmp_path / "file"
    no_memo.write_text("")
    test = get_dataset("cub", cub, "test")
    verify_splits({"test": test, "again": get_dataset("cub", cub, "test")}, memo_dir=no_memo, progress=False)
    assert len(count_opens) == 6
    # the full official train split and a subset of it share files: each file is decoded once
    full = get_dataset("cub", cub, "train", val_fraction=0.0)
    count_opens.clear()
    verify_splits({"train": full, "part": subset(full, [0, 1], split="val")}, memo_dir=no_memo, progress=False)
    assert len(count_opens) == len(full) == 12


def test_bad_files_in_several_splits_and_long_lists(tmp_path):
    make_cub(tmp_path, n_classes=4, per_class=4, test_per_class=2)
    splits = _splits(tmp_path, val_fraction=0.25)
    bad_train = splits["train"].root / splits["train"].sample_id(3)
    bad_train.write_bytes(b"")
    test = splits["test"]
    bad_test = sorted(test.root / test.sample_id(i) for i in range(7))
    for p in bad_test:
        p.write_bytes(b"nope")
    with pytest.raises(CorruptImageError) as e:
        verify_splits(splits, memo_dir=tmp_path / "memo", progress=False)
    msg = str(e.value)
    assert msg.startswith("8 images of cub/train, cub/test cannot be decoded: ")
    assert f"{bad_train} [cub/train]" in msg and f"{bad_test[0]} [cub/test]" in msg
    assert "; and 7 more: " in msg and ", ..." in msg
    assert sum(str(p) in msg for p in [bad_train, *bad_test]) == 5  # at most five files are listed


def test_missing_file_names_it(cub, tmp_path):
    test = get_dataset("cub", cub, "test")
    gone = test.root / test.sample_id(2)
    gone.unlink()
    with pytest.raises(DatasetNotFoundError, match=str(gone)):
        verify_images(test, memo_dir=tmp_path / "memo", progress=False)


def test_file_vanishing_after_listing(cub, tmp_path):
    test = get_dataset("cub", cub, "test")
    test.fingerprint()  # stats the files now; the file goes away before it is decoded
    gone = test.root / test.sample_id(2)
    gone.unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        verify_images(test, memo_dir=tmp_path / "memo", progress=False)
    assert str(e.value) == (
        f"image file not found (listed in cub/test): {gone}. The image folder is incomplete; re-extract the dataset "
        "archive."
    )


def test_progress_bar_path(cub, tmp_path, monkeypatch):
    monkeypatch.setattr(verify_mod, "PROGRESS_MIN_FILES", 1)
    verify_images(get_dataset("cub", cub, "test"), memo_dir=tmp_path / "memo", progress=True, workers=2)
    assert len(list((tmp_path / "memo").glob("*.json"))) == 1
