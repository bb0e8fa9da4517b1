"""WebDataset tar shards read by index: patterns, the index (built once, stored beside the shard or in the user's
cache folder, rebuilt when the shard changes), damaged shards and images, data.skip_bad, the fingerprint,
data=shards with its labels, and one run on unlabelled shards with a teacher cache that resumes mid-epoch exactly."""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from pand.cli import main
from pand.config import compose, to_plain
from pand.data import get_dataset
from pand.data import tar_shards as ts
from pand.data.assembly import UNLABELLED_SPLIT, load_splits
from pand.data.captions import captions_of
from pand.data.captions import load as load_captions
from pand.data.captions import run_splits
from pand.data.shards import read_classes
from pand.data.tar_shards import ShardDataset, expand_braces, index_locations, load_index, read_shards, shard_paths
from pand.data.unlabelled import UNLABELLED, unlabelled_shards
from pand.data.verify import verify_images
from pand.engine.config_checks import validate_train_config
from pand.engine.module import DistillationModule
from pand.errors import ConfigError, CorruptImageError, DatasetNotFoundError, PandError
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import encode_image, make_shards, write_shard


def _sample(i, c=0, ext="jpg", **extra):
    return f"{i:06d}", {ext: encode_image(c, 3, size=8, seed=i, ext=f".{ext}"), **extra}


def _shards(folder, n_shards=2, per_shard=3, start=0):
    """``folder/0000N.tar``: ``per_shard`` 8x8 images each (JPEG, every third a PNG), with a cls and a caption."""
    paths = []
    for s in range(n_shards):
        samples = [_sample(i, i % 3, "png" if i % 3 == 2 else "jpg", cls=str(i % 3).encode(), txt=f"n{i}".encode())
                   for i in range(start + s * per_shard, start + (s + 1) * per_shard)]
        paths.append(write_shard(folder / f"{s:05d}.tar", samples))
    return paths


def _open(pattern, **kw):
    samples = read_shards(str(pattern), setting="test", **kw)
    return ShardDataset("x", "unlabelled", ["a", "b", "c"], samples, [UNLABELLED] * len(samples))


def _ids(ds):
    return [ds.sample_id(i) for i in range(len(ds))]


# -- patterns -------------------------------------------------------------------------------------------------------
def test_brace_expansion_follows_braceexpand():
    assert expand_braces("/d/{00000..00003}.tar") == [f"/d/0000{i}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"] and expand_braces("{08..11}") == ["08", "09", "10", "11"]
    assert expand_braces("{0..10..5}") == ["0", "5", "10"] and expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]  # several braces: the product, left slowest
    assert expand_braces("x{a,{b,c}d}") == ["xa", "xbd", "xcd"] and expand_braces("{a..c}") == ["a", "b", "c"]
    assert expand_braces("{abc}/{1,2}") == ["{abc}/1", "{abc}/2"] and expand_braces("plain.tar") == ["plain.tar"]
    for bad, message in (("{0..3.tar", "never closed"), ("0..3}.tar", "closes nothing")):
        with pytest.raises(ConfigError, match=f"unbalanced braces in .*{message}"):
            expand_braces(bad)


def test_a_pattern_names_existing_shards_or_a_folder_of_them(tmp_path):
    paths = _shards(tmp_path / "s", n_shards=3)
    assert shard_paths("wds:s/{00000..00002}.tar", setting="x", relative_to=tmp_path) == paths
    assert shard_paths(f"wds:{tmp_path}/s/00002.tar::{tmp_path}/s/0000{{0,1}}.tar", setting="x") == \
        [paths[2], paths[0], paths[1]]
    assert shard_paths(f"wds:{tmp_path / 's'}", setting="x") == paths  # a folder: its .tar files, sorted
    with pytest.raises(ConfigError, match="names the shard .*00001.tar twice"):
        shard_paths(f"wds:{tmp_path}/s/{{00001,00001}}.tar", setting="x")
    pattern = f"wds:{tmp_path}/s/{{00000..00004}}.tar"
    with pytest.raises(DatasetNotFoundError) as err:
        shard_paths(pattern, setting="data.unlabelled")
    text = str(err.value)
    assert "\n" not in text and f"shard {tmp_path}/s/00003.tar does not exist" in text and pattern in text
    assert "2 of the 5 shards it names are missing" in text and "<key>.jpg" in text and "img2dataset" in text


# -- samples and the index ------------------------------------------------------------------------------------------
def test_samples_are_grouped_by_key_and_one_without_an_image_is_left_out_with_a_warning(tmp_path, caplog):
    shard = write_shard(tmp_path / "a.tar", [
        ("dir/x1", {"JPG": encode_image(0, 3, 8), "cls": b" 2\n", "json": b"{}"}),
        ("dir/x2", {"txt": b"no image here"}),
        ("x3", {"png": encode_image(1, 3, 8, ext=".png"), "jpg": encode_image(2, 3, 8), "npy": b"?"}),
        ("x4.tar", {"webp": encode_image(1, 3, 8, ext=".webp")}),  # the key ends at the first dot: x4, ext tar.webp
    ])
    with caplog.at_level(logging.WARNING, logger="pand"):
        ds = _open(shard)
    assert _ids(ds) == ["a.tar/dir/x1", "a.tar/x3"]
    assert [ds.member(i).ext for i in range(2)] == ["jpg", "jpg"]  # upper case read as jpg; jpg before png
    assert ds.load_image(1).size == (8, 8) and ds.load_image(1).mode == "RGB"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 samples without an image" in warnings[0]
    assert f"{shard}:dir/x2" in warnings[0] and f"{shard}:x4" in warnings[0]
    index = load_index(shard)
    assert index.cls == ["2", None] and index.no_image == ["dir/x2", "x4"]
    split = write_shard(tmp_path / "b.tar", [_sample(1), _sample(2), ("000001", {"cls": b"0"})])
    with pytest.raises(PandError, match=f"shard {split}: the members of sample 000001 are not consecutive"):
        load_index(split)
    twice = write_shard(tmp_path / "c.tar", [("k", {"jpg": b"1"}), ("k", {"jpg": b"2"})])
    with pytest.raises(PandError, match=f"shard {twice}: sample k has two jpg members"):
        load_index(twice)


def test_the_index_is_built_once_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    shard = _shards(tmp_path, n_shards=1)[0]
    ds = _open(shard)
    beside, _ = index_locations(shard)
    assert beside == tmp_path / "00000.tar.pand-index.json" and beside.is_file()
    record = json.loads(beside.read_text())
    assert record["size"] == shard.stat().st_size and record["mtime_ns"] == shard.stat().st_mtime_ns
    assert record["keys"] == ["000000", "000001", "000002"] and not record["checked"]
    built = beside.stat().st_mtime_ns

    def no_scan(*args, **kwargs):
        raise AssertionError("the shard was scanned again")

    monkeypatch.setattr(ts, "_scan", no_scan)
    again = _open(shard)
    assert beside.stat().st_mtime_ns == built and _ids(again) == _ids(ds)
    assert again.fingerprint() == ds.fingerprint()
    monkeypatch.undo()
    write_shard(shard, [_sample(i) for i in range(4)])  # rewritten: another size and modification time
    changed = _open(shard)
    assert len(changed) == 4 and json.loads(beside.read_text())["keys"][-1] == "000003"
    assert changed.fingerprint() != ds.fingerprint()


def test_a_read_only_shard_folder_keeps_its_index_in_the_user_cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    shard = _shards(folder, n_shards=1)[0]
    monkeypatch.setenv("PAND_CACHE_DIR", str(tmp_path / "cache"))
    real_write = ts.atomic_write_text

    def read_only(path, text):  # root writes into a folder without write permission: refuse it as the system would
        if Path(path).parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, text)

    monkeypatch.setattr(ts, "atomic_write_text", read_only)
    folder.chmod(0o555)
    try:
        ds = _open(shard)
        beside, cached = index_locations(shard)
        assert not beside.exists() and cached.is_file() and cached.parent == tmp_path / "cache" / "shard-index"
        assert (cached.parent / ".pand-output").is_file()  # a folder pand wrote: never walked as input images
        monkeypatch.setattr(ts, "_scan", lambda *a, **k: pytest.fail("the shard was scanned again"))
        assert _ids(_open(shard)) == _ids(ds)
    finally:
        folder.chmod(0o755)


def test_images_are_read_at_their_offsets_in_this_process_and_after_a_pickle_or_a_fork(tmp_path):
    paths = _shards(tmp_path, n_shards=2)
    ds = _open(f"wds:{tmp_path}/{{00000..00001}}.tar")
    first = [ds.load_image(i).tobytes() for i in range(len(ds))]
    assert len(ds._fds) == 2
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._fds == {} and [copy.load_image(i).tobytes() for i in range(len(ds))] == first
    ds._pid = -1  # as a forked loader worker sees it: the parent's descriptors are dropped, the shards re-opened
    assert ds.load_image(5).tobytes() == first[5] and ds._pid == os.getpid() and list(ds._fds) == [1]
    assert ds.sample_id(5) == "00001.tar/000005" and str(ds.member(5)) == f"{paths[1]}:000005.png"


# -- damage and skip_bad --------------------------------------------------------------------------------------------
def _truncated(folder):
    """Shard 00001.tar cut inside the data of its third sample's image; two complete samples stay before the cut."""
    paths = _shards(folder, n_shards=2)
    data = paths[1].read_bytes()
    cut = load_index(paths[1]).offset[2] + 10
    paths[1].write_bytes(data[:cut])
    return paths


def test_a_truncated_shard_is_refused_naming_it_and_its_complete_samples_unless_skip_bad(tmp_path, caplog):
    paths = _truncated(tmp_path)
    with pytest.raises(PandError) as err:
        _open(f"wds:{tmp_path}/{{00000..00001}}.tar")
    text = str(err.value)
    assert "\n" not in text and f"shard {paths[1]} is truncated" in text and "holds 1 complete sample." in text
    assert "data.skip_bad=true" in text
    with caplog.at_level(logging.WARNING, logger="pand"):
        ds = _open(f"wds:{tmp_path}/{{00000..00001}}.tar", skip_bad=True)
    # the sample before the cut may lack members that followed it: only the samples before it count as complete
    assert _ids(ds) == ["00000.tar/000000", "00000.tar/000001", "00000.tar/000002", "00001.tar/000003"]
    warning = [r.getMessage() for r in caplog.records]
    assert len(warning) == 1 and "data.skip_bad=true" in warning[0] and str(paths[1]) in warning[0]
    assert "in 1 of 2 shards" in warning[0] and "kept its 1 complete samples" in warning[0]
    record = json.loads(index_locations(paths[1])[0].read_text())
    assert record["truncated"]["at"] > 0 and record["keys"] == ["000003"]
    for cut, reason in ((0, "the file is empty"), (300, "does not start with a tar header")):
        paths[1].write_bytes(paths[0].read_bytes()[:cut])
        with pytest.raises(PandError, match=f"00001.tar is truncated or damaged at byte 0 .*{reason}.*holds 0 "):
            _open(paths[1])


def test_an_image_that_does_not_decode_is_named_when_read_and_by_verify_images_before_training(tmp_path):
    write_shard(tmp_path / "00000.tar", [_sample(0), ("000001", {"jpg": b"not a jpeg"}), _sample(2)])
    ds = _open(tmp_path / "00000.tar")
    assert len(ds) == 3  # nothing is decoded to index the shard
    with pytest.raises(CorruptImageError, match=f"cannot decode image {tmp_path}/00000.tar:000001.jpg: cannot "
                                                "identify image file$"):
        ds.load_image(1)
    with pytest.raises(CorruptImageError) as err:
        verify_images(ds, memo_dir=tmp_path / "memo", progress=False)
    assert f"1 image of x/unlabelled cannot be decoded: {tmp_path}/00000.tar:000001.jpg (cannot identify" in \
        str(err.value) and "data.skip_bad=true" in str(err.value)
    verify_images(_open(tmp_path / "00000.tar", skip_bad=True), memo_dir=tmp_path / "memo", progress=False)


def test_skip_bad_decodes_once_at_indexing_so_indices_never_shift(tmp_path, caplog, monkeypatch):
    write_shard(tmp_path / "00000.tar", [_sample(0), ("000001", {"jpg": b"garbage"}), _sample(2)])
    write_shard(tmp_path / "00001.tar", [_sample(3), _sample(4), ("000005", {"png": b"\x89PNG broken"})])
    pattern = f"wds:{tmp_path}/{{00000..00001}}.tar"
    plain = _open(pattern)
    assert len(plain) == 6 and not load_index(tmp_path / "00000.tar").checked
    with caplog.at_level(logging.WARNING, logger="pand"):
        kept = _open(pattern, skip_bad=True)  # the unchecked index is rebuilt, decoding every image once
    assert _ids(kept) == ["00000.tar/000000", "00000.tar/000002", "00001.tar/000003", "00001.tar/000004"]
    warning = [r.getMessage() for r in caplog.records if "skip_bad" in r.getMessage()]
    assert len(warning) == 1 and "2 images that do not decode" in warning[0] and "in 2 of 2 shards" in warning[0]
    assert f"{tmp_path}/00000.tar:000001.jpg" in warning[0] and f"{tmp_path}/00001.tar:000005.png" in warning[0]
    record = json.loads(index_locations(tmp_path / "00001.tar")[0].read_text())
    assert record["checked"] and record["bad"][0][0] == 2 and record["counts"]["undecodable"] == 1
    monkeypatch.setattr(ts, "_scan", lambda *a, **k: pytest.fail("indexed again"))
    again = _open(pattern, skip_bad=True)
    assert _ids(again) == _ids(kept) and again.fingerprint() == kept.fingerprint() != plain.fingerprint()
    assert len(_open(pattern)) == 6  # without skip_bad the checked index serves every sample; verify names the bad


def test_the_fingerprint_is_stable_across_processes_and_follows_the_content(tmp_path):
    # Fixed bytes, not encoded images (whose size depends on the codec's version): the digest below was computed by
    # another process (with another hash seed), and a teacher cache made then must still match.
    def shard(name, sizes):
        return write_shard(tmp_path / name, [(f"{k:03d}", {"jpg": b"j" * n, "cls": b"1"}) for k, n in sizes])

    shard("00000.tar", [(0, 10), (1, 11)])
    shard("00001.tar", [(2, 12)])
    pattern = f"wds:{tmp_path}/{{00000..00001}}.tar"
    assert _open(pattern).fingerprint() == "fd2a73233e2b379505dd173282b49984780639f8d58c54905027b5cd9c418321"
    assert _open(pattern).fingerprint() == _open(pattern).fingerprint()
    shard("00001.tar", [(2, 13)])  # one image changed
    assert _open(pattern).fingerprint() != "fd2a73233e2b379505dd173282b49984780639f8d58c54905027b5cd9c418321"
    labelled = ShardDataset("x", "unlabelled", ["a", "b"], read_shards(pattern, setting="t"), [0, 1, 1])
    assert labelled.fingerprint() != _open(pattern).fingerprint()  # the labels are part of it


# -- data.unlabelled and data=shards --------------------------------------------------------------------------------
def test_unlabelled_shards_ignore_their_labels_and_are_checked_against_the_test_images(cub_root, tmp_path):
    _shards(tmp_path / "s", n_shards=2)
    ds = unlabelled_shards(f"wds:{tmp_path}/s/{{00000..00001}}.tar", ["a", "b", "c"], "cub")
    assert set(ds.targets) == {UNLABELLED} and ds.split == "unlabelled" and len(ds) == 6
    test_image = next((cub_root / "images").rglob("*_0002_*.jpg"))  # a test image of the CUB fixture
    write_shard(tmp_path / "s" / "00002.tar", [("copy", {"jpg": test_image.read_bytes()})])
    data = {"name": "cub", "root": str(cub_root), "num_classes": 3, "val_fraction": 0.2, "split_seed": 0,
            "samples_per_class": 2, "unlabelled": f"wds:{tmp_path}/s/{{00000..00002}}.tar"}
    with pytest.raises(ConfigError, match=f"1 unlabelled image is also a test image .*{tmp_path}/s/00002.tar:"
                                          f"copy.jpg = {test_image}"):
        load_splits(data)
    assert len(load_splits({**data, "allow_overlap": True})[UNLABELLED_SPLIT]) == 7


def test_data_shards_reads_labels_from_cls_and_carves_val_from_train_unless_given(tmp_path):
    root = make_shards(tmp_path / "d", per_class=4, test_per_class=2)
    train, val, test = (get_dataset("shards", root, split, val_fraction=0.25) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (9, 3, 6) and set(_ids(train)).isdisjoint(_ids(val))
    assert test.classes == ["red square", "green circle", "blue triangle"] and test.targets == [0, 1, 2] * 2
    make_shards(tmp_path / "v", val_per_class=1)
    assert len(get_dataset("shards", tmp_path / "v", "val")) == 3  # a val/ folder is the val split
    names = tmp_path / "names.txt"
    names.write_text("# display names\nred\ngreen\nblue\n")
    options = {"shards": {"train": "wds:train/{00000..00001}.tar", "test": "test"}}
    part = get_dataset("shards", root, "train", val_fraction=0.0, class_names_file=names, options=options)
    assert len(part) == 10 and part.classes == ["red", "green", "blue"] and read_classes(names)[0] == "red"
    with pytest.raises(ConfigError, match="dataset 'shards' has no setting nope"):
        get_dataset("shards", root, "test", options={"nope": 1})


def test_data_shards_refuses_a_sample_without_a_label_or_outside_the_classes_naming_it(tmp_path):
    root = make_shards(tmp_path, per_class=1, test_per_class=1)
    for members, message in (({}, "has no .cls member"), ({"cls": b"3"}, r"is 3, outside 0..2 \(3 classes in "),
                             ({"cls": b"two"}, "is 'two', not an integer class index")):
        key, sample = _sample(7)
        write_shard(root / "test" / "00001.tar", [(key, {**sample, **members}), (key + "b", {**sample, **members})])
        with pytest.raises(PandError, match=f"data.shards.test: .*sample {root}/test/00001.tar:000007 {message}.*"
                                            r"\(1 more sample like it\)"):
            get_dataset("shards", root, "test")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="class names of the shards dataset are missing"):
        get_dataset("shards", root, "test")


def test_the_shard_settings_are_checked_with_the_config(cub_root, tmp_path):
    def config(*extra, data="cub"):
        return to_plain(compose("train", [f"data={data}", f"data.root={cub_root}", f"run_dir={tmp_path}/run",
                                          "teacher=tiny", "method=kd", *extra]))

    with pytest.raises(ConfigError, match="data.skip_bad=true is set, but no image of this run comes from tar shards"):
        validate_train_config(config("data.skip_bad=true"))
    with pytest.raises(ConfigError, match="data.unlabelled: unbalanced braces"):
        validate_train_config(config("data.samples_per_class=2", "data.unlabelled='wds:/d/{0..3.tar'"))
    with pytest.raises(ConfigError, match=r"data.shards has unknown split\(s\) \['tran'\]"):
        validate_train_config(config("+data.shards.tran=x", data="shards"))
    composed = config("data.shards.train='wds:train/{00000..00009}.tar'", "data.skip_bad=true", data="shards")
    assert composed["data"]["shards"] == {"train": "wds:train/{00000..00009}.tar", "val": None, "test": None}


def test_captions_in_tar_shards_are_a_captions_dataset(tmp_path):
    _shards(tmp_path / "train", n_shards=2, per_shard=4)
    _shards(tmp_path / "test", n_shards=1, per_shard=3, start=100)
    train = load_captions(tmp_path, "train")  # img2dataset's webdataset output: train/*.tar, detected
    assert len(train) == 8 and captions_of(train)[5] == ("n5",) and train.sample_id(5) == "00001.tar/000005"
    parts = run_splits({"root": str(tmp_path), "val_fraction": 0.25, "split_seed": 0,
                        "split_paths": {"test": "wds:test/00000.tar"}})
    assert len(parts.unlabelled) == 6 and len(parts.val) == 2 and captions_of(parts.test) == [("n100",), ("n101",),
                                                                                              ("n102",)]
    write_shard(tmp_path / "test" / "00000.tar", [_sample(1), _sample(2, txt=b"two")])
    with pytest.raises(PandError, match=f"1 image without caption \\({tmp_path}/test/00000.tar:000001 \\(no .txt"):
        load_captions(tmp_path, "test")
    assert captions_of(load_captions(tmp_path, "test", incomplete="skip")) == [("two",)]


# -- a run ----------------------------------------------------------------------------------------------------------
def test_a_run_on_unlabelled_shards_with_a_teacher_cache_resumes_mid_epoch_bit_for_bit(cub_root, tmp_path,
                                                                                      monkeypatch):
    _shards(tmp_path / "shards", n_shards=3, per_shard=4, start=1000)
    cache = tmp_path / "cache"
    extra = ("method=kd", "data.samples_per_class=2", f"data.unlabelled='wds:{tmp_path}/shards/{{00000..00002}}.tar'",
             "student=cifar", "student.name=resnet8", "trainer.max_epochs=1", "test=false", f"cache.dir={cache}",
             "cache.views=2", "checkpoint.every_n_steps=1")

    def argv(run, *more):
        return [*tiny_overrides(cub_root, run, *extra), *more]

    assert main(["cache", "build", *argv(tmp_path / "unused")]) == 0
    assert json.loads((cache / "meta.json").read_text())["complete"]
    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", *argv(straight)]) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["labelled_images"] == 3 and summary["unlabelled_images"] == 12  # 4 batches of 1 + 3
    real_step = DistillationModule.training_step

    def killed_in_the_third_batch(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", killed_in_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", *argv(killed)])
    monkeypatch.setattr(DistillationModule, "training_step", real_step)
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # saved mid-epoch
    assert main(["train", *argv(killed), f"ckpt_path={last}"]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in
            (straight, killed))
    assert a["global_step"] == b["global_step"] == 4 and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
