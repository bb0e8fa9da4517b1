"""Bad input: missing files name the path and show the layout; corrupt images name the file."""

from __future__ import annotations

import pytest

from pand.data import get_dataset
from pand.errors import ConfigError, CorruptImageError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import make_aircraft, make_cub, make_dogs, make_imagefolder, make_pets


@pytest.mark.parametrize(
    "name, folder, layout_line",
    [
        ("cub", "CUB_200_2011", "train_test_split.txt"),
        ("aircraft", "fgvc-aircraft-2013b", "data/variants.txt"),
        ("pets", "oxford-iiit-pet", "annotations/trainval.txt"),
        ("dogs", "stanford_dogs", "lists/train_list.mat"),
    ],
)
def test_missing_dataset(tmp_path, name, folder, layout_line):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(name, tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / folder) in msg
    assert layout_line in msg and "Expected layout" in msg
    assert "download=True" in msg and "data.download=true" in msg
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize(
    "make, name, rel",
    [
        (make_cub, "cub", "train_test_split.txt"),
        (make_cub, "cub", "classes.txt"),
        (make_aircraft, "aircraft", "data/images_variant_val.txt"),
        (make_pets, "pets", "annotations/test.txt"),
        (make_dogs, "dogs", "lists/train_list.mat"),
    ],
)
def test_missing_list_file(tmp_path, make, name, rel):
    d = make(tmp_path)
    (d / rel).unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(name, tmp_path, "val")
    msg = str(e.value)
    assert str(d / rel) in msg and "Expected layout" in msg


@pytest.mark.parametrize("make, name", [(make_cub, "cub"), (make_aircraft, "aircraft"), (make_pets, "pets"),
                                        (make_dogs, "dogs"), (make_imagefolder, "imagefolder")])  # fmt: skip
def test_annotation_references_missing_image(tmp_path, make, name):
    make(tmp_path)
    ds = get_dataset(name, tmp_path, "test")
    victim = ds.root / ds.sample_id(1)
    victim.unlink()
    if name == "imagefolder":  # no list file: the image simply is not listed any more
        assert len(get_dataset(name, tmp_path, "test")) == len(ds) - 1
        return
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(name, tmp_path, "test")
    assert str(victim) in str(e.value)
    # a dataset built before the file vanished reports it when loading
    with pytest.raises(DatasetNotFoundError, match=str(victim)):
        ds.load_image(1)


@pytest.mark.parametrize("content", [b"this is not a jpeg", b"", None])
def test_corrupt_image(tmp_path, content):
    make_cub(tmp_path)
    ds = get_dataset("cub", tmp_path, "test")
    path = ds.root / ds.sample_id(2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if content is None else content)  # None: truncated JPEG
    ds = get_dataset("cub", tmp_path, "test")  # constructing does not open images
    with pytest.raises(CorruptImageError) as e:
        ds[2]
    assert str(path) in str(e.value)
    ds.load_image(1)  # the others still load


def test_num_classes_mismatch_message(tmp_path):
    make_dogs(tmp_path, n_classes=3)
    with pytest.raises(ConfigError) as e:
        get_dataset("dogs", tmp_path, "train", num_classes=120)
    assert "120" in str(e.value) and "3 classes" in str(e.value) and str(tmp_path / "stanford_dogs") in str(e.value)


def test_malformed_lines(tmp_path):
    d = make_aircraft(tmp_path)
    p = d / "data" / "images_variant_test.txt"
    p.write_text(p.read_text() + "1234567 Not A Variant\n")
    with pytest.raises(PandError) as e:
        get_dataset("aircraft", tmp_path, "test")
    assert "Not A Variant" in str(e.value) and str(p) in str(e.value)
    d = make_cub(tmp_path / "c")
    (d / "images.txt").write_text((d / "images.txt").read_text() + "justonefield\n")
    with pytest.raises(PandError, match="malformed line"):
        get_dataset("cub", tmp_path / "c", "test")


def test_bad_val_fraction(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        get_dataset("cub", tmp_path, "val", val_fraction=1.0)
