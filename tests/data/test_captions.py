"""The captions dataset (``data=captions``): COCO captions, JSONL / CSV pairs and img2dataset shards, each built here
in its exact layout; a run's splits (val scored by its own captions, the training images unlabelled, the test split
captioned and classless); and every missing, corrupt or unpaired file refused by name.

The builders (``make_coco``, ``make_pairs``, ``make_img2dataset``) are imported by the other caption tests."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from pand.config import compose, to_plain
from pand.data import get_dataset
from pand.data.assembly import UNLABELLED_SPLIT, load_splits
from pand.data.captions import (
    CaptionDataset,
    CaptionTable,
    captions_of,
    detect_format,
    has_class_labels,
    load,
    selection_vocabulary,
)
from pand.data.unlabelled import UNLABELLED, TrainingPool
from pand.data.verify import verify_images
from pand.engine.data import PandDataModule
from pand.errors import ConfigError, CorruptImageError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import make_cub, write_image

N_TRAIN, N_TEST = 10, 4


def _caption(split: str, i: int, k: int = 0) -> str:
    return f"{split} image {i}, caption {k}"


def _image(path: Path, split: str, i: int) -> Path:
    # distinct pixels for every image of every split: the overlap check compares splits by content
    return write_image(path, i % 4, 4, seed=(1000 if split == "test" else 0) + 17 * i + (500 if split == "val" else 0))


def make_coco(root, n_train=N_TRAIN, n_test=N_TEST, per_image=2) -> Path:
    """COCO 2017 captions: annotations/captions_{train,val}2017.json + train2017/ val2017/ (val2017 is the test
    split); image ``i`` has ``per_image`` captions, the first image's listed last (annotations out of image order)."""
    root = Path(root)
    for split, folder, n in (("train", "train2017", n_train), ("test", "val2017", n_test)):
        images, annotations = [], []
        for i in range(n):
            name = f"{i + 1:012d}.jpg"
            _image(root / folder / name, split, i)
            images.append({"id": 100 + i, "file_name": name, "height": 32, "width": 32})
            annotations += [{"image_id": 100 + i, "id": 1000 * k + i, "caption": _caption(split, i, k)}
                            for k in range(per_image)]
        annotations = annotations[per_image:] + annotations[:per_image]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root


def make_pairs(root, kind="jsonl", n_train=N_TRAIN, n_test=N_TEST, keys=("image", "text"), with_val=False) -> Path:
    """``train.<kind>`` / ``test.<kind>`` (and ``val.<kind>``) of (image, text) pairs, images under images/<split>/;
    even images have a second caption on a second row."""
    root = Path(root)
    splits = [("train", n_train), ("test", n_test)] + ([("val", 3)] if with_val else [])
    for split, n in splits:
        rows = []
        for i in range(n):
            rel = f"images/{split}/{i:04d}.png"
            _image(root / rel, split, i)
            rows.append((rel, _caption(split, i)))
            if i % 2 == 0:
                rows.append((rel, _caption(split, i, 1)))
        path = root / f"{split}.{kind}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps({keys[0]: r, keys[1]: t}) + "\n" for r, t in rows))
        else:
            sep = "\t" if kind == "tsv" else ","
            path.write_text(f"{keys[0]}{sep}{keys[1]}\n" + "".join(f'{r}{sep}"{t}"\n' for r, t in rows))
    return root


def make_img2dataset(root, n_train=N_TRAIN, n_test=N_TEST, shard=4) -> Path:
    """img2dataset output per split: train/00000/000000000.jpg + .txt (+ .json), ``shard`` images per shard."""
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            folder = root / split / f"{i // shard:05d}"
            _image(folder / f"{i:09d}.jpg", split, i)
            (folder / f"{i:09d}.txt").write_text(_caption(split, i) + "\n")
            (folder / f"{i:09d}.json").write_text(json.dumps({"key": f"{i:09d}", "status": "success"}))
    return root


BUILDERS = {"coco": make_coco, "pairs": make_pairs, "img2dataset": make_img2dataset}


def _data(root, *extra):
    return to_plain(compose("train", ["data=captions", f"data.root={root}", "data.val_fraction=0.2",
                                      "data.verify_images=false", *extra]))["data"]


# -- the three layouts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_each_layout_is_detected_and_every_split_read_with_its_captions(fmt, tmp_path):
    root = BUILDERS[fmt](tmp_path / fmt)
    assert detect_format(root) == fmt
    train, test = load(root, "train"), load(root, "test")
    assert isinstance(train, CaptionDataset) and (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert train.classes == [] and set(train.targets) == {UNLABELLED} and not has_class_labels(train)
    assert all(train.path(i).is_file() for i in range(len(train)))
    per_image = {"coco": 2, "pairs": None, "img2dataset": 1}[fmt]
    for i, caps in enumerate(train.captions):
        want = per_image or (2 if i % 2 == 0 else 1)
        assert list(caps) == [_caption("train", i, k) for k in range(want)]
    assert test.captions[0][0] == _caption("test", 0)
    # the plain entry point serves val carved from train, seeded
    val = get_dataset("captions", root, "val", val_fraction=0.2)
    assert len(val) == 2 and captions_of(val) == [train.captions[train.relpaths.index(val.sample_id(i))]
                                                  for i in range(2)]


def test_coco_reads_any_split_file_and_image_folder(tmp_path):
    root = make_coco(tmp_path / "coco")
    shutil.copytree(root / "val2017", root / "karpathy_val")
    shutil.copy(root / "annotations" / "captions_val2017.json", root / "annotations" / "karpathy_val.json")
    paths = {"val": "annotations/karpathy_val.json"}
    with pytest.raises(ConfigError, match=r"cannot tell the image folder.*data.image_dirs.val"):
        load(root, "val", split_paths=paths)
    val = load(root, "val", split_paths=paths, image_dirs={"val": "karpathy_val"})
    assert len(val) == N_TEST and val.relpaths[0].startswith("karpathy_val/")
    with pytest.raises(ConfigError, match="unknown split"):
        load(root, "train", split_paths={"trian": "x.json"})


@pytest.mark.parametrize(("kind", "keys"), [("csv", ("image", "text")), ("tsv", ("filepath", "title")),
                                            ("csv", ("filepath", "title")), ("jsonl", ("filepath", "title"))])
def test_pairs_read_csv_and_tsv_and_open_clip_column_names(kind, keys, tmp_path):
    root = make_pairs(tmp_path / "p", kind=kind, keys=keys)
    train = load(root, "train")
    assert len(train) == N_TRAIN and train.captions[0] == (_caption("train", 0), _caption("train", 0, 1))


def test_pairs_columns_and_separator_can_be_named(tmp_path):
    root = tmp_path / "p"
    _image(root / "a.jpg", "train", 0)
    (root / "train.csv").write_text("id;picture;sentence\n1;a.jpg;a red square\n")
    (root / "test.csv").write_text("id;picture;sentence\n1;a.jpg;a red square\n")
    with pytest.raises(PandError, match=r"none of the image columns 'image' or 'filepath'.*data.image_key"):
        load(root, "train", csv_separator=";")
    ds = load(root, "train", csv_separator=";", image_key="picture", text_key="sentence")
    assert ds.captions == [("a red square",)]
    with pytest.raises(PandError, match=r"has no image column 'photo' \(data.image_key\)"):
        load(root, "train", csv_separator=";", image_key="photo", text_key="sentence")


def test_an_image_on_several_rows_or_with_a_list_of_texts_has_several_captions(tmp_path):
    root = tmp_path / "p"
    _image(root / "x" / "a.jpg", "train", 0)
    (root / "x" / "train.jsonl").write_text('{"image": "a.jpg", "text": ["one", "two"]}\n'
                                            '{"image": "./a.jpg", "text": "three"}\n')
    ds = load(root, "train", split_paths={"train": "x/train.jsonl", "test": "x/train.jsonl"})
    assert ds.relpaths == ["x/a.jpg"] and ds.captions == [("one", "two", "three")]


def test_img2dataset_reads_every_shard_and_split_folders_are_configurable(tmp_path):
    root = make_img2dataset(tmp_path / "i", shard=3)
    assert sorted({p.split("/")[1] for p in load(root, "train").relpaths}) == ["00000", "00001", "00002", "00003"]
    (root / "train").rename(root / "web")
    ds = load(root, "train", format="img2dataset", split_paths={"train": "web"})
    assert len(ds) == N_TRAIN and ds.relpaths[0] == "web/00000/000000000.jpg"


# -- a run's splits -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_a_run_has_no_labelled_image_and_selects_on_val_captions(fmt, tmp_path):
    root = BUILDERS[fmt](tmp_path / fmt)
    splits = load_splits(_data(root))
    train, val, test, pool = (splits[k] for k in ("train", "val", "test", UNLABELLED_SPLIT))
    assert (len(train), len(val), len(test), len(pool)) == (0, 2, N_TEST, N_TRAIN - 2)
    # val: each image labelled with its own caption among the val captions, which are the run's classes
    vocabulary = [captions_of(val)[i][0] for i in range(2)]
    assert val.classes == vocabulary and val.targets == [0, 1]
    for split in (train, test, pool):
        assert split.classes == vocabulary
    assert set(pool.targets) == {UNLABELLED} and set(test.targets) == {UNLABELLED}
    assert captions_of(test) == list(load(root, "test").captions)
    # val is carved from train: disjoint from the training pool, seeded
    ids = lambda ds: {ds.sample_id(i) for i in range(len(ds))}  # noqa: E731
    assert not ids(val) & ids(pool) and len(ids(val) | ids(pool)) == N_TRAIN
    again = load_splits(_data(root))
    assert [again["val"].sample_id(i) for i in range(2)] == [val.sample_id(i) for i in range(2)]
    other = load_splits(_data(root, "data.split_seed=3"))
    assert ids(other["val"]) != ids(val)
    limited = load_splits(_data(root, "data.unlabelled_limit=3"))
    assert len(limited[UNLABELLED_SPLIT]) == 3


def test_an_official_val_split_is_used_as_it_is(tmp_path):
    root = make_pairs(tmp_path / "p", with_val=True)
    splits = load_splits(_data(root))
    assert len(splits["val"]) == 3 and len(splits[UNLABELLED_SPLIT]) == N_TRAIN
    assert splits["val"].classes == [_caption("val", i) for i in range(3)]


def test_the_val_vocabulary_gives_each_image_a_caption_no_other_image_took():
    vocabulary, rows = selection_vocabulary([("a", "b"), ("a", "c"), ("a",), ("d",)])
    assert vocabulary == ["a", "c", "d"] and rows == [0, 1, 0, 2]


def test_a_training_pool_of_captioned_and_plain_images_lists_captions_for_the_captioned_ones(tmp_path):
    captioned = load(make_img2dataset(tmp_path / "i"), "train")
    plain = get_dataset("cub", make_cub(tmp_path / "c"), "train")
    pool = TrainingPool(plain, captioned)
    found = captions_of(pool)
    assert found[: len(plain)] == [()] * len(plain) and found[len(plain):] == list(captioned.captions)
    assert captions_of(plain) is None


def test_the_caption_table_holds_each_text_once_and_its_choice_is_a_function_of_seed_epoch_and_index():
    table = CaptionTable.of([("a", "b"), (), ("b", "c")])
    assert table.texts == ("a", "b", "c") and table.ids == ((0, 1), (), (1, 2))
    assert table.choose(0, 0, 1) == -1
    picks = {table.choose(0, epoch, 0) for epoch in range(20)}
    assert picks == {0, 1}  # both captions of image 0 get their turn
    assert [table.choose(3, e, 2) for e in range(10)] == [table.choose(3, e, 2) for e in range(10)]
    assert CaptionTable.of([(), ()]) is None and CaptionTable.of(None) is None
    assert table.digest() != CaptionTable.of([("a", "b"), (), ("b", "d")]).digest()


def test_the_fingerprint_changes_with_the_captions(tmp_path):
    root = make_pairs(tmp_path / "p")
    before = load(root, "train").fingerprint()
    path = root / "train.jsonl"
    path.write_text(path.read_text().replace("caption 0", "caption zero", 1))
    assert load(root, "train").fingerprint() != before


def test_the_config_composes():
    data = to_plain(compose("train", ["data=captions", "data.root=/x"]))["data"]
    assert data["name"] == "captions" and data["templates"] == ["{}"] and data["format"] == "auto"
    assert data["split_paths"] == {"train": None, "val": None, "test": None}


# -- refusals -------------------------------------------------------------------------------------------------------
def test_a_missing_layout_or_file_is_named_with_the_expected_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)no captions dataset found.*data.format=coco.*"
                                                   r"data.format=pairs.*data.format=img2dataset"):
        load(tmp_path / "empty", "train")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere", "train")
    root = make_coco(tmp_path / "coco")
    (root / "annotations" / "captions_val2017.json").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)test split.*missing .*captions_val2017.json.*Expected layout"):
        load(root, "test")
    with pytest.raises(DatasetNotFoundError, match=r"data.split_paths.train .*missing .*nope.json"):
        load(root, "train", split_paths={"train": "nope.json"})
    shutil.rmtree(root / "train2017")
    with pytest.raises(DatasetNotFoundError, match=r"image folder of .*captions_train2017.json.*missing .*train2017"):
        load(root, "train")


def test_a_folder_holding_two_layouts_or_an_unknown_format_is_refused(tmp_path):
    root = make_coco(tmp_path / "r")
    make_pairs(root)
    with pytest.raises(ConfigError, match=r"several caption layouts \(coco, pairs\); choose one with "
                                          r"data.format=coco\|pairs"):
        load(root, "train")
    assert len(load(root, "train", format="pairs")) == N_TRAIN
    with pytest.raises(ConfigError, match="data.format='csv' is not allowed"):
        load(root, "train", format="csv")
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        load(root, "train", download=True)


def test_a_corrupt_image_is_named(tmp_path):
    root = make_pairs(tmp_path / "p")
    bad = root / "images" / "train" / "0003.png"
    bad.write_bytes(b"not an image")
    ds = load(root, "train")
    with pytest.raises(CorruptImageError, match=str(bad)):
        ds.load_image(ds.relpaths.index("images/train/0003.png"))
    with pytest.raises(CorruptImageError, match=str(bad)):
        verify_images(ds, progress=False, workers=1)


def test_captions_without_image_and_images_without_caption_are_counted_and_refused_or_skipped(tmp_path, caplog):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 999, "id": 1, "caption": "nobody's picture"})
    data["images"].append({"id": 998, "file_name": "lonely.jpg"})
    _image(root / "train2017" / "lonely.jpg", "train", 50)
    path.write_text(json.dumps(data))
    (root / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(PandError, match=r"2 captions without image \(annotations\[\d+\] \(image id 999, not in "
                                        r"'images'\), .*000000000003.jpg \(listed in captions_train2017.json, no such "
                                        r"file\)\); 1 image without caption \(.*lonely.jpg\).*data.incomplete=skip"):
        load(root, "train")
    with caplog.at_level(logging.WARNING, logger="pand"):
        ds = load(root, "train", incomplete="skip")
    assert len(ds) == N_TRAIN - 1
    assert "left out (data.incomplete=skip): 2 captions without image" in caplog.text
    assert "1 image without caption" in caplog.text


def test_img2dataset_and_pairs_report_unpaired_files(tmp_path):
    root = make_img2dataset(tmp_path / "i")
    (root / "train" / "00000" / "000000001.txt").unlink()
    (root / "train" / "00001" / "000000005.jpg").unlink()
    (root / "train" / "00001" / "000000006.txt").write_text("   \n")
    with pytest.raises(PandError, match=r"1 caption without image \(.*000000005.txt\); 2 images without caption "
                                        r"\(.*000000001.jpg \(no 000000001.txt\), .*000000006.jpg \(empty caption\)\)"):
        load(root, "train")
    assert len(load(root, "train", incomplete="skip")) == N_TRAIN - 3
    root = make_pairs(tmp_path / "p")
    (root / "images" / "train" / "0001.png").unlink()
    with pytest.raises(PandError, match=r"1 caption without image \(line 3 of .*train.jsonl: .*0001.png\)"):
        load(root, "train")


def test_malformed_files_name_the_file_and_the_line(tmp_path):
    root = make_pairs(tmp_path / "p")
    path = root / "train.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(PandError, match=rf"malformed line {N_TRAIN + N_TRAIN // 2 + 1} in .*train.jsonl"):
        load(root, "train")
    path.write_text('{"image": "images/train/0000.png", "text": 5}\n')
    with pytest.raises(PandError, match=r"malformed line 1 .*a \"text\" string"):
        load(root, "train")
    path.write_text('{"image": "../outside.png", "text": "x"}\n')
    with pytest.raises(PandError, match="outside the dataset folder"):
        load(root, "train")
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_train2017.json"
    path.write_text("{")
    with pytest.raises(PandError, match=r"captions_train2017.json is not valid JSON"):
        load(root, "train")
    path.write_text(json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(PandError, match=r"images\[0\] = .* lacks 'id' or 'file_name'"):
        load(root, "train")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(PandError, match=r"not a COCO captions file: .*found \['images'\]"):
        load(root, "train")


@pytest.mark.parametrize(("setting", "message"), [
    ("data.samples_per_class=0", "data.samples_per_class=0 does not go with data=captions"),
    ("data.unlabelled=rest", "data.unlabelled='rest' does not go with data=captions"),
    ("data.class_split=base_novel", "there are no classes to split"),
    ("data.num_classes=3", "data.num_classes=3 does not go with data=captions"),
    ("data.val_fraction=0.05", r"has 1 image\(s\) with 1 distinct caption\(s\).*needs at least 2"),
    ("data.incomplete=maybe", "data.incomplete='maybe' is not allowed"),
])
def test_settings_a_captions_run_cannot_honour_are_refused(setting, message, tmp_path):
    root = make_pairs(tmp_path / "p")
    with pytest.raises(ConfigError, match=message):
        load_splits(_data(root, setting))


def test_a_captions_runs_settings_are_refused_together_before_anything_loads(tmp_path, monkeypatch):
    from pand.engine.config_checks import validate_train_config

    monkeypatch.setattr("pand.data.captions.load", lambda *a, **k: pytest.fail("the dataset was read"))
    config = to_plain(compose("train", ["data=captions", f"data.root={tmp_path / 'absent'}", "method=openvocab",
                                        "data.num_classes=3", "data.incomplete=maybe", "data.csv_separator=';;'",
                                        f"run_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError) as err:
        validate_train_config(config)
    for part in ("data.num_classes=3 does not go with data=captions", "data.incomplete='maybe' is not allowed",
                 "data.csv_separator=';;' is not allowed"):
        assert part in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_training_images_of_a_captions_dataset_can_be_the_unlabelled_pool_of_a_classification_run(tmp_path):
    cub, root = make_cub(tmp_path / "cub"), make_img2dataset(tmp_path / "web")
    data = to_plain(compose("train", ["data=cub", f"data.root={cub}", "data.num_classes=3", "data.samples_per_class=2",
                                      f"data.unlabelled=captions:{root}", "data.verify_images=false"]))["data"]
    splits = load_splits(data)
    pool = splits[UNLABELLED_SPLIT]
    assert len(pool) == N_TRAIN and pool.classes == splits["test"].classes and set(pool.targets) == {UNLABELLED}
    assert captions_of(pool) == list(load(root, "train").captions)
    assert captions_of(splits["val"]) is None and has_class_labels(splits["test"])


def test_a_label_free_run_on_a_captions_pool_labels_its_val_images_with_the_teacher(tmp_path):
    cub, root = make_cub(tmp_path / "cub"), make_pairs(tmp_path / "pairs")
    data = to_plain(compose("train", ["data=cub", f"data.root={cub}", "data.num_classes=3", "data.samples_per_class=0",
                                      f"data.unlabelled=captions:{root}", "data.verify_images=false",
                                      "data.num_workers=0", "data.image_size=32", "data.resize_size=36"]))["data"]
    module = PandDataModule(data)
    assert module.label_free and not module.caption_vocabulary
    assert captions_of(module.splits["val"]) is not None  # carved from the captioned pool, scored once labelled
    assert len(module.eval_dataloader("val").dataset) == len(module.splits["val"])
