"""Unlabelled training images: where they come from (rest of the training split, a folder), the training pool that
indexes them after the labelled ones, and the label-free splits."""

import pytest

from pand.data.assembly import UNLABELLED_SPLIT, load_splits, unlabelled_source
from pand.data.unlabelled import UNLABELLED, TrainingPool, choose, unlabelled_folder
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import write_image


def _data(root, **over):
    base = {"name": "cub", "root": str(root), "num_classes": 3, "val_fraction": 0.2, "split_seed": 0,
            "verify_images": False, "samples_per_class": 2}
    return {**base, **over}


def _ids(ds):
    return {ds.sample_id(i) for i in range(len(ds))}


def test_rest_is_every_training_image_outside_the_labelled_pool_with_its_label_hidden(cub_root):
    splits = load_splits(_data(cub_root, unlabelled="rest"))
    full = load_splits(_data(cub_root, samples_per_class=None, val_fraction=0.0))["train"]
    rest = splits[UNLABELLED_SPLIT]
    assert len(splits["train"]) + len(splits["val"]) == 6 and len(rest) == 18 - 6
    assert _ids(rest).isdisjoint(_ids(splits["train"]) | _ids(splits["val"]))
    assert _ids(rest) | _ids(splits["train"]) | _ids(splits["val"]) == _ids(full)
    assert set(rest.targets) == {UNLABELLED}
    assert _ids(splits["test"]).isdisjoint(_ids(rest))


def test_unlabelled_limit_is_a_seeded_choice(cub_root):
    a = load_splits(_data(cub_root, unlabelled="rest", unlabelled_limit=5))[UNLABELLED_SPLIT]
    b = load_splits(_data(cub_root, unlabelled="rest", unlabelled_limit=5))[UNLABELLED_SPLIT]
    c = load_splits(_data(cub_root, unlabelled="rest", unlabelled_limit=5, split_seed=1))[UNLABELLED_SPLIT]
    assert len(a) == 5 and _ids(a) == _ids(b) and _ids(a) != _ids(c)
    assert choose(10, None, 0) == list(range(10)) and choose(10, 99, 0) == list(range(10))


def test_a_folder_is_read_recursively_and_its_subfolder_names_are_not_labels(cub_root, tmp_path):
    folder = tmp_path / "mine"
    for rel in ("a.jpg", "deep/er/b.png", "Black_footed_Albatross/c.jpg", ".hidden/d.jpg", "notes.txt"):
        if rel.endswith("txt"):
            (folder / rel).write_text("x")
        else:
            write_image(folder / rel, 0, 3)
    splits = load_splits(_data(cub_root, samples_per_class=None, unlabelled=str(folder)))
    extra = splits[UNLABELLED_SPLIT]
    assert sorted(_ids(extra)) == ["Black_footed_Albatross/c.jpg", "a.jpg", "deep/er/b.png"]
    assert set(extra.targets) == {UNLABELLED} and extra.classes == splits["train"].classes


def test_missing_or_empty_folders_and_rest_without_a_pool_are_refused_with_the_reason(cub_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"nowhere does not exist.*any layout"):
        unlabelled_folder(tmp_path / "nowhere", ["a"], "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        unlabelled_folder(tmp_path / "empty", ["a"], "x")
    with pytest.raises(ConfigError, match="samples_per_class"):
        unlabelled_source({"unlabelled": "rest", "samples_per_class": None})
    assert unlabelled_source({"unlabelled": "none", "samples_per_class": 3}) is None
    assert unlabelled_source({"unlabelled": None, "samples_per_class": 0}) == "rest"  # label-free default


def test_label_free_splits_hold_val_out_of_the_unlabelled_images(cub_root):
    splits = load_splits(_data(cub_root, samples_per_class=0, val_fraction=0.25))
    assert len(splits["train"]) == 0 and splits["train"].classes == splits["test"].classes
    assert len(splits["val"]) == round(0.25 * 18) and len(splits[UNLABELLED_SPLIT]) == 18 - len(splits["val"])
    assert _ids(splits["val"]).isdisjoint(_ids(splits[UNLABELLED_SPLIT]))
    assert set(splits["val"].targets) == {UNLABELLED}  # the teacher labels them before training


def test_training_pool_indexes_labelled_images_first_and_fingerprints_both_parts(cub_root, tmp_path):
    splits = load_splits(_data(cub_root, unlabelled="rest"))
    pool = TrainingPool(splits["train"], splits[UNLABELLED_SPLIT])
    n = len(splits["train"])
    assert len(pool) == n + 12 and pool.n_labelled == n and pool.n_unlabelled == 12
    assert pool.targets[:n] == splits["train"].targets and set(pool.targets[n:]) == {UNLABELLED}
    assert pool.sample_id(n) == "unlabelled:" + splits[UNLABELLED_SPLIT].sample_id(0)
    assert pool.load_image(n).size == splits[UNLABELLED_SPLIT].load_image(0).size
    fewer = load_splits(_data(cub_root, unlabelled="rest", unlabelled_limit=11))
    assert TrainingPool(fewer["train"], fewer[UNLABELLED_SPLIT]).fingerprint() != pool.fingerprint()
    assert TrainingPool(splits["train"], splits[UNLABELLED_SPLIT]).fingerprint() == pool.fingerprint()


def test_the_image_folder_root_as_unlabelled_images_is_refused_for_its_test_images(tmp_path):
    from tests.fixtures.datasets import make_imagefolder

    root = make_imagefolder(tmp_path / "shapes", per_class=3, test_per_class=1)
    data = _data(root, name="imagefolder", num_classes=3, samples_per_class=None, unlabelled=str(root))
    with pytest.raises(ConfigError) as e:
        load_splits(data)
    text = str(e.value)
    assert "3 unlabelled images are also test images (the same bytes): " in text
    assert f"{root / 'test' / 'blue_triangle' / 'blue_triangle_000.jpg'} (one file in both)" in text
    assert text.endswith("set data.allow_overlap=true to run anyway (the run summary records the overlap)")
    splits = load_splits({**data, "allow_overlap": True})
    assert len(splits[UNLABELLED_SPLIT]) == 12


def test_image_files_pand_does_not_read_are_named_in_a_warning(cub_root, tmp_path, caplog):
    import logging

    from PIL import Image

    folder = tmp_path / "mine"
    write_image(folder / "a.jpg", 0, 3)
    (folder / "sub").mkdir()
    for name in ("b.gif", "c.tif"):
        Image.new("RGB", (8, 8)).save(folder / "sub" / name)
    with caplog.at_level(logging.WARNING, logger="pand"):
        assert _ids(unlabelled_folder(folder, ["a"], "x")) == {"a.jpg"}
    assert caplog.records[-1].getMessage() == (
        f"data.unlabelled: 2 image files under {folder} are left out, of a type pand does not read (it reads .jpg "
        f".jpeg .png .bmp .webp): {folder / 'sub' / 'b.gif'}, {folder / 'sub' / 'c.tif'}")
    (folder / "a.jpg").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        unlabelled_folder(folder, ["a"], "x")
    assert str(e.value) == (f"data.unlabelled: no image files under {folder}: it holds 1 .gif, 1 .tif files; pand "
                            "reads .jpg .jpeg .png .bmp .webp")


def test_a_class_without_training_images_cannot_have_a_few_shot_pool(cub_root):
    split = cub_root / "train_test_split.txt"
    labels = dict(line.split() for line in (cub_root / "image_class_labels.txt").read_text().splitlines())
    # every image of class 3 moved to the test split
    split.write_text("".join(f"{i} {'0' if labels[i] == '3' else flag}\n"
                             for i, flag in (line.split() for line in split.read_text().splitlines())))
    with pytest.raises(PandError) as e:
        load_splits(_data(cub_root, samples_per_class=2))
    assert str(e.value) == (f"data.samples_per_class=2: class 'Sooty Albatross' has no image in the training split of "
                            f"cub at {cub_root}, so its labelled pool would be empty; add images of it, or use a "
                            "dataset without that class")
