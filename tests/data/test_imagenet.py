"""ImageNet: train/ and val/ class folders, val as pand's test split, synset names, matching class folders."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from pand.data import get_dataset, imagenet
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import make_imagenet, write_image

WNIDS = ["n01440764", "n01443537", "n01484850"]


def test_splits_and_synset_names(tmp_path):
    make_imagenet(tmp_path, n_classes=3, per_class=5, test_per_class=2)
    te = get_dataset("imagenet", tmp_path, "test", num_classes=3)
    tr = get_dataset("imagenet", tmp_path, "train", val_fraction=0.2)
    va = get_dataset("imagenet", tmp_path, "val", val_fraction=0.2)
    assert te.classes == ["tench", "goldfish", "great white shark"]  # first name of each synset
    assert tr.classes == va.classes == te.classes
    # test is the official val folder
    assert len(te) == 6 and all(te.sample_id(i).startswith("val/") for i in range(len(te)))
    assert te.sample_id(0) == "val/n01440764/ILSVRC2012_val_00000001.JPEG" and te.root == tmp_path
    # val is carved from train (stratified): the test images are never used for choosing
    ids_tr = {tr.sample_id(i) for i in range(len(tr))}
    ids_va = {va.sample_id(i) for i in range(len(va))}
    assert len(tr) == 12 and len(va) == 3 and not ids_tr & ids_va
    assert all(i.startswith("train/") for i in ids_tr | ids_va)
    assert Counter(va.targets) == {0: 1, 1: 1, 2: 1}
    for ds in (tr, va, te):
        for i in range(len(ds)):
            assert WNIDS[ds.targets[i]] == ds.sample_id(i).split("/")[1]
    img, label = te[5]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 2
    again = get_dataset("imagenet", tmp_path, "val", val_fraction=0.2)
    assert [again.sample_id(i) for i in range(len(again))] == [va.sample_id(i) for i in range(len(va))]


def test_folder_names_without_mapping(tmp_path):
    make_imagenet(tmp_path, synset_mapping=False)
    assert get_dataset("imagenet", tmp_path, "test").classes == WNIDS


def test_dataset_in_imagenet_subfolder(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    ds = get_dataset("imagenet", tmp_path, "test")
    assert ds.root == tmp_path / "imagenet" and ds.classes[0] == "tench"


def test_duplicate_first_names_get_the_wnid(tmp_path):
    make_imagenet(tmp_path, n_classes=3, synset_mapping=False)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 crane\nn01443537 goldfish, Carassius auratus\nn01484850 Crane, construction crane\n"
    )
    assert get_dataset("imagenet", tmp_path, "test").classes == [
        "crane (n01440764)",
        "goldfish",
        "Crane (n01484850)",
    ]


@pytest.mark.parametrize("style", ["synsets", "positional", "tab"])
def test_class_names_file(tmp_path, style):
    make_imagenet(tmp_path)  # LOC_synset_mapping.txt exists too: the class_names_file wins
    f = tmp_path / "names.txt"
    if style == "synsets":
        f.write_text("n01484850 white shark, great white shark\nn01440764 Tinca_tinca, tench\nn01443537 carp\n")
        expected = ["Tinca tinca", "carp", "white shark"]
    elif style == "positional":  # e.g. CLIP's curated ImageNet class names, in sorted wnid order
        f.write_text("tench\ngoldfish\ngreat white shark, man-eater\n")
        expected = ["tench", "goldfish", "great white shark, man-eater"]
    else:
        f.write_text("n01443537\tgold fish\nn01440764\ta tench\nn01484850\tshark, white\n")
        expected = ["a tench", "gold fish", "shark, white"]
    assert get_dataset("imagenet", tmp_path, "train", class_names_file=f).classes == expected
    with pytest.raises(DatasetNotFoundError, match="nope.txt"):
        get_dataset("imagenet", tmp_path, "train", class_names_file=tmp_path / "nope.txt")


def test_bad_synset_mapping(tmp_path):
    make_imagenet(tmp_path)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(ConfigError) as e:
        get_dataset("imagenet", tmp_path, "test")
    assert str(e.value) == f"{mapping} gives no name for class folder 'n01484850'"
    mapping.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 shark\nn01440764 carp\n")
    with pytest.raises(ConfigError) as e:
        get_dataset("imagenet", tmp_path, "test")
    assert str(e.value) == f"line 4 of {mapping}: synset n01440764 is already listed at line 1"
    mapping.write_text("n01440764 tench\nn01443537\tgoldfish\nn01484850 shark\n")
    with pytest.raises(PandError, match=f"malformed line 2 in {mapping}"):
        get_dataset("imagenet", tmp_path, "test")


def test_class_folders_must_match(tmp_path):
    make_imagenet(tmp_path / "a")
    write_image(tmp_path / "a" / "val" / "n09999999" / "x.JPEG", 0, 3)
    with pytest.raises(ConfigError) as e:
        get_dataset("imagenet", tmp_path / "a", "train")
    val, train = tmp_path / "a" / "val", tmp_path / "a" / "train"
    assert str(e.value) == (
        f"class folder {val / 'n09999999'} has no counterpart in {train}; train/ and val/ must hold the same class "
        "folders"
    )
    make_imagenet(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "val" / "n01443537")
    shutil.rmtree(tmp_path / "b" / "val" / "n01484850")
    with pytest.raises(ConfigError) as e:
        get_dataset("imagenet", tmp_path / "b", "test")
    assert str(e.value) == (
        f"class folder {tmp_path / 'b' / 'train' / 'n01443537'} has no counterpart in {tmp_path / 'b' / 'val'}; "
        "train/ and val/ must hold the same class folders (1 more class folder differs)"
    )


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("imagenet", tmp_path, "train", download=True)
    msg = str(e.value)
    assert msg.startswith(f"ImageNet (ILSVRC-2012) not found under {tmp_path} (download=True cannot fetch it")
    assert f"missing {tmp_path / 'train'}" in msg and "Expected layout" in msg
    assert "val/n01440764/ILSVRC2012_val_00000293.JPEG" in msg and "image-net.org" in msg
    assert "There is no automatic download" in msg and "data.download=true" not in msg
    make_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("imagenet", tmp_path, "train")
    assert f"missing {tmp_path / 'val'}" in str(e.value) and "Expected layout" in str(e.value)


def test_empty_split(tmp_path):
    make_imagenet(tmp_path, test_per_class=0)
    for wnid in WNIDS:
        (tmp_path / "val" / wnid).mkdir(parents=True, exist_ok=True)
    assert len(get_dataset("imagenet", tmp_path, "train")) > 0
    with pytest.raises(DatasetNotFoundError, match="no images"):
        get_dataset("imagenet", tmp_path, "test")


def test_fingerprint(tmp_path):
    make_imagenet(tmp_path / "a")
    fp = get_dataset("imagenet", tmp_path / "a", "test").fingerprint()
    assert fp == get_dataset("imagenet", tmp_path / "a", "test").fingerprint()
    assert fp != get_dataset("imagenet", tmp_path / "a", "train").fingerprint()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert get_dataset("imagenet", tmp_path / "b", "test").fingerprint() == fp
    f = tmp_path / "b" / "val" / "n01443537" / "ILSVRC2012_val_00000003.JPEG"
    f.write_bytes(f.read_bytes() + b"\0")
    assert get_dataset("imagenet", tmp_path / "b", "test").fingerprint() != fp
    (tmp_path / "a" / "LOC_synset_mapping.txt").unlink()  # other class names
    assert get_dataset("imagenet", tmp_path / "a", "test").fingerprint() != fp


def test_config(tmp_path):
    from pand.config import compose, to_plain

    data = to_plain(compose("train", ["data=imagenet"]))["data"]
    assert data["name"] == "imagenet" and data["num_classes"] == 1000 and data["templates"] == ["a photo of a {}."]
    assert (data["image_size"], data["resize_size"]) == (224, 256)
    assert data["mean"] == [0.485, 0.456, 0.406] and data["std"] == [0.229, 0.224, 0.225]
    make_imagenet(tmp_path)
    with pytest.raises(ConfigError, match="num_classes=1000 but the imagenet dataset"):
        get_dataset("imagenet", tmp_path, "test", num_classes=data["num_classes"])
    assert imagenet.HAS_OFFICIAL_VAL is False
    assert np.asarray(get_dataset("imagenet", tmp_path, "test").load_image(0)).shape == (32, 32, 3)
