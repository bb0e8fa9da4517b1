"""CIFAR-100: the pickled cifar-100-python layout, pixel order, safe unpickling, download, config."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest

from pand.data import cifar100, get_dataset
from pand.data.base import ArrayDataset
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import cifar100_arrays, cifar100_rows, make_archive, make_cifar100


class Payload:
    """A class of the test module: pickling an instance references ``tests.data.test_cifar100.Payload``."""

    def __init__(self) -> None:
        self.x = 1


class MakesDir:
    """Unpickling this with plain pickle calls ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_test_split_pixels_and_names(tmp_path):
    d = make_cifar100(tmp_path, n_classes=5, per_class=4, test_per_class=2)
    ds = get_dataset("cifar100", tmp_path, "test", num_classes=5)
    images, labels = cifar100_arrays(10, 5, seed=2)
    assert isinstance(ds, ArrayDataset) and ds.name == "cifar100" and ds.split == "test"
    assert len(ds) == 10 and ds.targets == labels.tolist()
    assert ds.classes == ["apple", "aquarium fish", "baby", "bear", "beaver"]  # underscores to spaces
    assert ds.root == d and ds.sample_id(3) == "test/3"
    img, label = ds[3]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 3
    arr = np.asarray(img)
    assert np.array_equal(arr, images[3])
    # the stored row is channel-planar: pixel (row y, column x) is R at y*32+x, G at 1024+y*32+x, B at 2048+y*32+x
    row = pickle.loads((d / "test").read_bytes())["data"][3]
    y, x = 5, 17
    assert tuple(arr[y, x]) == (row[y * 32 + x], row[1024 + y * 32 + x], row[2048 + y * 32 + x])
    assert np.array_equal(arr[..., 2], row[2048:].reshape(32, 32))
    assert ds.images.shape == (10, 32, 32, 3) and ds.images.flags.c_contiguous


def test_train_val_carved_stratified(tmp_path):
    make_cifar100(tmp_path, n_classes=5, per_class=4, test_per_class=1)
    tr = get_dataset("cifar100", tmp_path, "train", val_fraction=0.25, split_seed=0)
    va = get_dataset("cifar100", tmp_path, "val", val_fraction=0.25, split_seed=0)
    assert cifar100.HAS_OFFICIAL_VAL is False
    ids_tr = {tr.sample_id(i) for i in range(len(tr))}
    ids_va = {va.sample_id(i) for i in range(len(va))}
    assert len(tr) == 15 and len(va) == 5 and not ids_tr & ids_va
    assert ids_tr | ids_va == {f"train/{i}" for i in range(20)}
    assert Counter(va.targets) == {c: 1 for c in range(5)}
    images, _ = cifar100_arrays(20, 5, seed=1)
    i = int(va.sample_id(2).split("/")[1])
    assert np.array_equal(np.asarray(va.load_image(2)), images[i])
    other = get_dataset("cifar100", tmp_path, "val", val_fraction=0.25, split_seed=1)
    assert {other.sample_id(i) for i in range(len(other))} != ids_va


@pytest.mark.parametrize("py2, bytes_keys", [(True, False), (False, True)])
def test_python2_files_and_bytes_keys(tmp_path, py2, bytes_keys):
    """The original files (Python 2 pickles: numpy.core.multiarray, str data) and bytes keys load the same."""
    make_cifar100(tmp_path / "py3")
    make_cifar100(tmp_path / "other", py2=py2, bytes_keys=bytes_keys)
    raw = (tmp_path / "other" / "cifar-100-python" / "train").read_bytes()
    if py2:
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"numpy._core" not in raw
    a = get_dataset("cifar100", tmp_path / "py3", "test")
    b = get_dataset("cifar100", tmp_path / "other", "test")
    assert a.classes == b.classes and a.targets == b.targets
    assert np.array_equal(a.images, b.images)
    assert a.fingerprint() == b.fingerprint()
    # what torchvision's loader (plain pickle, encoding="latin1") reads from the same file
    plain = pickle.loads(raw, encoding="latin1")
    data = plain[b"data" if bytes_keys else "data"]
    assert np.array_equal(cifar100.safe_load(tmp_path / "other" / "cifar-100-python" / "train")[
        b"data" if bytes_keys else "data"], data)  # fmt: skip


def test_fewer_classes_than_names(tmp_path):
    make_cifar100(tmp_path, n_classes=3, n_names=10)
    ds = get_dataset("cifar100", tmp_path, "test")
    assert len(ds.classes) == 10 and ds.classes[1] == "aquarium fish" and set(ds.targets) == {0, 1, 2}
    with pytest.raises(ConfigError, match="10 classes"):
        get_dataset("cifar100", tmp_path, "test", num_classes=100)


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    make_cifar100(tmp_path / "a")
    tr = get_dataset("cifar100", tmp_path / "a", "train")
    fp = tr.fingerprint()
    assert len(fp) == 64 and fp == get_dataset("cifar100", tmp_path / "a", "train").fingerprint()
    assert fp != get_dataset("cifar100", tmp_path / "a", "val").fingerprint()
    assert fp != get_dataset("cifar100", tmp_path / "a", "test").fingerprint()
    # the same files elsewhere: same fingerprint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert get_dataset("cifar100", tmp_path / "b", "train").fingerprint() == fp
    # one pixel byte of a train item changed (a new folder, so no cached read is involved): another fingerprint
    d = tmp_path / "c" / "cifar-100-python"
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    obj = pickle.loads((d / "train").read_bytes())
    obj["data"][tr.indices[3], 1500] ^= 1
    (d / "train").write_bytes(pickle.dumps(obj))
    assert get_dataset("cifar100", tmp_path / "c", "train").fingerprint() != fp
    # a renamed class: another fingerprint
    d = tmp_path / "e" / "cifar-100-python"
    shutil.copytree(tmp_path / "a", tmp_path / "e")
    meta = pickle.loads((d / "meta").read_bytes())
    meta["fine_label_names"][0] = "pear"
    (d / "meta").write_bytes(pickle.dumps(meta))
    assert get_dataset("cifar100", tmp_path / "e", "train").fingerprint() != fp


def test_label_outside_the_names(tmp_path):
    d = make_cifar100(tmp_path, n_classes=5)
    obj = pickle.loads((d / "test").read_bytes())
    obj["fine_labels"][4], obj["fine_labels"][6] = 5, -1
    (d / "test").write_bytes(pickle.dumps(obj))
    with pytest.raises(PandError) as e:
        get_dataset("cifar100", tmp_path, "test")
    assert str(e.value) == (
        f"{d / 'test'}: fine label 5 at index 4 is outside 0..4 ({d / 'meta'} lists 5 fine label names); "
        "1 more label is out of range after it"
    )


def test_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("cifar100", tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "Expected layout" in msg
    assert "meta" in msg and "fine_label_names" in msg and "download=True" in msg
    assert isinstance(e.value, FileNotFoundError)
    d = make_cifar100(tmp_path)
    (d / "meta").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("cifar100", tmp_path, "test")
    assert f"missing {d / 'meta'}" in str(e.value) and "Expected layout" in str(e.value)
    make_cifar100(tmp_path / "x")
    (tmp_path / "x" / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing .*test"):
        get_dataset("cifar100", tmp_path / "x", "test")
    assert len(get_dataset("cifar100", tmp_path / "x", "train", val_fraction=0.0)) == 20  # train still loads


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "EOFError"),
        (b"this is not a pickle at all", "UnpicklingError"),
        (None, ""),  # truncated
    ],
)
def test_corrupt_pickle(tmp_path, content, what):
    d = make_cifar100(tmp_path)
    path = d / "test"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(PandError) as e:
        get_dataset("cifar100", tmp_path, "test")
    msg = str(e.value)
    assert msg.startswith(f"cannot read CIFAR-100 file {path}: not a valid pickle (") and what in msg
    assert "corrupt or truncated" in msg


def test_wrong_structure(tmp_path):
    d = make_cifar100(tmp_path)
    (d / "test").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(PandError, match="is not a CIFAR-100 data file: it holds a list, not a dict"):
        get_dataset("cifar100", tmp_path, "test")
    (d / "test").write_bytes(pickle.dumps({"data": cifar100_rows(cifar100_arrays(2, 2)[0])}))
    with pytest.raises(PandError) as e:
        get_dataset("cifar100", tmp_path, "test")
    assert str(e.value) == f"{d / 'test'} is not a CIFAR-100 data file: no 'fine_labels' entry (keys: 'data')"
    (d / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "fine_labels": [0, 1]}))
    with pytest.raises(PandError, match=r"'data' must be a uint8 array \[N, 3072\].*uint8 \(2, 1024\)"):
        get_dataset("cifar100", tmp_path, "test")
    (d / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1, 1]}))
    with pytest.raises(PandError, match="has 2 images but 3 fine_labels"):
        get_dataset("cifar100", tmp_path, "test")


@pytest.mark.parametrize("kind", ["function", "reduce", "custom_class", "builtin_eval", "protocol0"])
def test_disallowed_globals_are_refused_without_running(tmp_path, kind):
    d = make_cifar100(tmp_path)
    victim = tmp_path / "created-by-unpickling"
    payload = {
        "function": lambda: pickle.dumps(os.getcwd),
        "reduce": lambda: pickle.dumps({"data": MakesDir(str(victim)), "fine_labels": []}),
        "custom_class": lambda: pickle.dumps({"data": Payload(), "fine_labels": []}),
        "builtin_eval": lambda: pickle.dumps(eval),
        "protocol0": lambda: pickle.dumps(MakesDir(str(victim)), protocol=0),
    }[kind]()
    # sanity: plain pickle would really run it
    if kind in ("reduce", "protocol0"):
        pickle.loads(payload)
        assert victim.is_dir()
        victim.rmdir()
    (d / "meta").write_bytes(payload)
    with pytest.raises(PandError) as e:
        get_dataset("cifar100", tmp_path, "train")
    msg = str(e.value)
    assert msg.startswith(f"{d / 'meta'} holds objects other than arrays and lists (") and "; refused." in msg
    assert not victim.exists()
    assert not isinstance(e.value, DatasetNotFoundError)


def test_refusal_message(tmp_path):
    path = tmp_path / "meta"
    path.write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(PandError) as e:
        cifar100.safe_load(path)
    assert str(e.value) == (
        f"{path} holds objects other than arrays and lists ('{os.getcwd.__module__}.getcwd'); refused. pand unpickles "
        "only numpy arrays, lists, strings and numbers from CIFAR-100 files; replace it with the file from the "
        "official cifar-100-python.tar.gz"
    )
    # numpy's protocol-5 array pickling (numpy._core.numeric._frombuffer) is not what the CIFAR files use
    path.write_bytes(pickle.dumps(np.zeros(3, np.uint8), protocol=5))
    with pytest.raises(PandError, match="_frombuffer"):
        cifar100.safe_load(path)
    # a persistent id (the hook torch.load uses for tensors) is refused too
    path.write_bytes(b"\x80\x02Pstorage\n.")
    with pytest.raises(PandError, match=r"\(a persistent id\); refused"):
        cifar100.safe_load(path)
    # plain data needs no global at all
    path.write_bytes(pickle.dumps({"a": [1, "x", b"y", 2.5, (3, None, True)]}))
    assert cifar100.safe_load(path) == {"a": [1, "x", b"y", 2.5, (3, None, True)]}


def test_download_from_local_archive(tmp_path, monkeypatch):
    src = make_cifar100(tmp_path / "src", n_classes=4, per_class=3, test_per_class=2)
    archive = tmp_path / "server" / "cifar-100-python.tar.gz"
    md5 = make_archive(src, archive)
    entry = {"url": archive.as_uri(), "md5": md5, "filename": archive.name}
    monkeypatch.setitem(cifar100.SOURCES, "archive", entry)
    root = tmp_path / "data"
    tr = get_dataset("cifar100", root, "train", download=True)
    assert len(tr) + len(get_dataset("cifar100", root, "val")) == 12
    assert (root / "cifar-100-python" / "meta").is_file() and (root / archive.name).is_file()
    assert not list(root.glob("*.part"))
    archive.unlink()  # present now: nothing is fetched again
    assert len(get_dataset("cifar100", root, "test", download=True)) == 8
    # a wrong checksum leaves nothing behind
    md5 = make_archive(src, tmp_path / "src2.tgz")
    bad = {**entry, "url": (tmp_path / "src2.tgz").as_uri(), "md5": "0" * 32}
    monkeypatch.setitem(cifar100.SOURCES, "archive", bad)
    with pytest.raises(PandError) as e:
        get_dataset("cifar100", tmp_path / "fresh", "train", download=True)
    assert md5 in str(e.value) and "0" * 32 in str(e.value)
    assert not list((tmp_path / "fresh").glob("*"))


def test_sources_come_from_torchvision(monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr(cifar100, "SOURCES", {"archive": None})
    src = cifar100.sources()["archive"]
    assert (src["url"], src["md5"], src["filename"]) == (tv.CIFAR100.url, tv.CIFAR100.tgz_md5, tv.CIFAR100.filename)
    assert src["url"] == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert src["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_array_dataset_channels():
    rgb = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    ds = ArrayDataset("x", "test", ["a", "b"], rgb, [0, 1])
    assert np.array_equal(np.asarray(ds.load_image(1)), rgb[1]) and ds.load_image(1).size == (5, 4)
    grey = rgb[..., 0]
    g3 = ArrayDataset("x", "test", ["a", "b"], grey, [0, 1])
    g4 = ArrayDataset("x", "test", ["a", "b"], grey[..., None], [0, 1])
    for g in (g3, g4):
        arr = np.asarray(g.load_image(0))
        assert arr.shape == (4, 5, 3) and all(np.array_equal(arr[..., c], grey[0]) for c in range(3))
    assert len({ds.fingerprint(), g3.fingerprint(), g4.fingerprint()}) == 3
    for bad in (rgb.astype(np.float32), np.zeros((2, 4, 5, 2), np.uint8), np.zeros((2, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8 array"):
            ArrayDataset("x", "test", ["a", "b"], bad, [0, 1])


def test_config_and_transforms(tmp_path):
    from pand.config import compose, to_plain
    from pand.data.transforms import ReplayableAugment, eval_transform, view_generator
    from pand.engine.data import augment_config

    data = to_plain(compose("train", ["data=cifar100"]))["data"]
    assert data["name"] == "cifar100" and data["num_classes"] == 100 and data["templates"] == ["a photo of a {}."]
    assert (data["image_size"], data["resize_size"]) == (32, 32)
    assert data["mean"] == [0.5071, 0.4865, 0.4409] and data["std"] == [0.2673, 0.2564, 0.2762]
    cfg = augment_config(data)
    assert cfg.min_crop_size == 28 and cfg.degrees == 0 and not cfg.blur and cfg.flip_p == 0.5
    assert cfg.brightness == cfg.contrast == cfg.saturation == cfg.hue == 0
    make_cifar100(tmp_path)
    ds = get_dataset("cifar100", tmp_path, "test", transform=eval_transform(32, 32, data["mean"], data["std"]))
    x, _ = ds[0]
    assert tuple(x.shape) == (3, 32, 32)
    aug = ReplayableAugment(cfg)
    view, params = aug(ds.load_image(0), view_generator(0, 0, 0))
    assert tuple(view.shape) == (3, 32, 32) and 28 <= params[2] <= 32
    assert aug.apply(ds.load_image(0), aug.identity_params((32, 32))).allclose(x)
