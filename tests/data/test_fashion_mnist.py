"""Fashion-MNIST: IDX parsing (raw and gz), search order, the system-path fallback."""

from __future__ import annotations

import numpy as np
import pytest

from pand.data import fashion_mnist, get_dataset
from pand.errors import DatasetNotFoundError, PandError
from tests.fixtures.datasets import fashion_mnist_arrays, make_fashion_mnist, write_idx


@pytest.fixture(autouse=True)
def no_system_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-dir")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_parsing(tmp_path, gz):
    make_fashion_mnist(tmp_path, n_train=30, n_test=20, gz=gz)
    test = get_dataset("fashion_mnist", tmp_path, "test")
    images, labels = fashion_mnist_arrays(20, seed=2)
    assert len(test) == 20 and test.targets == labels.tolist()
    assert test.classes == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ]  # fmt: skip
    img, label = test[3]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 3
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], images[3]) and np.array_equal(arr[..., 1], images[3])
    assert test.sample_id(3) == "test/3"
    tr = get_dataset("fashion_mnist", tmp_path, "train", val_fraction=0.2)
    va = get_dataset("fashion_mnist", tmp_path, "val", val_fraction=0.2)
    assert len(tr) + len(va) == 30 and len(va) == 10  # 1 of 3 per class -> round(0.6) = 1 each
    assert va.sample_id(0).startswith("train/")


@pytest.mark.parametrize("sub", ["FashionMNIST/raw", "fashion-mnist"])
def test_search_subfolders(tmp_path, sub):
    make_fashion_mnist(tmp_path, subdir=sub)
    assert len(get_dataset("fashion_mnist", tmp_path, "test")) == 20


def test_system_path_fallback(tmp_path, monkeypatch):
    system = make_fashion_mnist(tmp_path / "usr-share", n_train=40, n_test=10)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", system)
    ds = get_dataset("fashion_mnist", tmp_path / "empty-root", "test")
    assert len(ds) == 10
    # files in root win over the system path
    make_fashion_mnist(tmp_path / "empty-root", n_train=40, n_test=12)
    assert len(get_dataset("fashion_mnist", tmp_path / "empty-root", "test")) == 12


def test_missing_files_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("fashion_mnist", tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "download=True" in msg
    assert "FashionMNIST/raw" in msg


def test_bad_magic_and_truncated(tmp_path):
    make_fashion_mnist(tmp_path, gz=False)
    images, _ = fashion_mnist_arrays(20, seed=2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", images)  # a 3-d file where labels belong
    with pytest.raises(PandError, match="magic"):
        get_dataset("fashion_mnist", tmp_path, "test")
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(PandError, match=str(p)):
        get_dataset("fashion_mnist", tmp_path, "train")


def test_real_system_files_if_installed():
    """The Debian package, when present on this machine (not required)."""
    path = fashion_mnist.Path("/usr/share/datasets/fashion-mnist")
    if not (path / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    labels = fashion_mnist.read_idx(path / "t10k-labels-idx1-ubyte.gz", fashion_mnist.LABELS_MAGIC)
    assert labels.shape == (10000,) and labels.max() == 9


def test_label_outside_the_ten_classes(tmp_path):
    make_fashion_mnist(tmp_path, gz=False)
    _, labels = fashion_mnist_arrays(20, seed=2)
    labels[7], labels[12] = 10, 255
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(PandError) as e:
        get_dataset("fashion_mnist", tmp_path, "test", num_classes=10)
    assert str(e.value) == (
        f"{path}: label 10 at index 7 is outside 0..9 (Fashion-MNIST has 10 classes); 1 more label is out of range "
        "after it"
    )
