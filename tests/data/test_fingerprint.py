"""fingerprint(): stable, split-specific, sensitive to file size, label and class names; no image decoding."""

from __future__ import annotations

import pytest

from pand.data import get_dataset
from tests.fixtures.datasets import make_cub, make_fashion_mnist


def test_file_dataset_fingerprint(tmp_path, monkeypatch):
    make_cub(tmp_path)
    a = get_dataset("cub", tmp_path, "train")
    b = get_dataset("cub", tmp_path, "train")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert a.fingerprint() != get_dataset("cub", tmp_path, "val").fingerprint()
    assert a.fingerprint() != get_dataset("cub", tmp_path, "test").fingerprint()
    assert a.fingerprint() != get_dataset("cub", tmp_path, "train", split_seed=1).fingerprint()

    # computed without opening images
    import PIL.Image

    def boom(*args, **kwargs):
        raise AssertionError("fingerprint opened an image")

    monkeypatch.setattr(PIL.Image, "open", boom)
    fp_before = get_dataset("cub", tmp_path, "train").fingerprint()
    monkeypatch.undo()

    # a file whose size changes changes the fingerprint
    path = a.root / a.sample_id(0)
    path.write_bytes(path.read_bytes() + b"\0")
    assert get_dataset("cub", tmp_path, "train").fingerprint() != fp_before
    assert a.fingerprint() == fp_before  # cached on the object


def test_fingerprint_independent_of_location(tmp_path):
    import shutil

    make_cub(tmp_path / "x")
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    assert (
        get_dataset("cub", tmp_path / "x", "test").fingerprint()
        == get_dataset("cub", tmp_path / "y", "test").fingerprint()
    )


def test_fingerprint_sees_labels_and_classes(tmp_path):
    d = make_cub(tmp_path)
    fp = get_dataset("cub", tmp_path, "test").fingerprint()
    labels = d / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " 3"  # image 2 (a test image) -> class 3
    labels.write_text("\n".join(lines) + "\n")
    fp2 = get_dataset("cub", tmp_path, "test").fingerprint()
    assert fp2 != fp
    classes = d / "classes.txt"
    classes.write_text(classes.read_text().replace("Sooty_Albatross", "Sooty_Bird"))
    assert get_dataset("cub", tmp_path, "test").fingerprint() != fp2


@pytest.mark.parametrize("gz", [True, False])
def test_array_dataset_fingerprint(tmp_path, gz, monkeypatch):
    from pand.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")
    make_fashion_mnist(tmp_path / "a", gz=gz)
    make_fashion_mnist(tmp_path / "b", gz=not gz)
    fa = get_dataset("fashion_mnist", tmp_path / "a", "train").fingerprint()
    assert fa == get_dataset("fashion_mnist", tmp_path / "b", "train").fingerprint()  # same bytes, other encoding
    assert fa != get_dataset("fashion_mnist", tmp_path / "a", "val").fingerprint()
    assert fa != get_dataset("fashion_mnist", tmp_path / "a", "test").fingerprint()
    make_fashion_mnist(tmp_path / "c", n_train=61)
    assert fa != get_dataset("fashion_mnist", tmp_path / "c", "train").fingerprint()
