"""The teacher cache (format 4, rows in shards) refuses damaged files naming the shard file and the reason, repairs
them on request, rebuilds a damaged finished shard when it resumes, and never leaves a half-written shard behind: a
full disk while a shard is written is a clear error, and a shard is finished or absent.

Every test works on a copy of one cache built once for the module (15 images in shards of 4 rows: 00000..00003, the
last one of 3 rows; 2 views) or compares a cache it builds with that one, file by file."""

import errno
import json
import logging
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pand.cache.integrity as integrity
import pand.cache.teacher as teacher_mod
import pand.cache.teacher.build as teacher_build
import pand.cache.teacher.layout as layout
from pand.cache.integrity import CacheDamagedError
from pand.cache.teacher import TeacherCache, cache_record
from pand.cache.teacher.layout import SHARDS, finished_rows, row_layout, shard_bytes, stored_array
from pand.cli import main
from pand.config import teacher_cache_settings
from pand.engine.data import PandDataModule
from pand.engine.teacher_side import open_or_build_cache, teacher_spec
from pand.errors import MismatchError, OutputError, PandError
from pand.io import atomic_write_json
from pand.locks import LOCK_FILE
from pand.teachers.registry import load_teacher
from pand.teachers.source import LiveTeacherSource
from tests.cache.test_teacher_cache import _config as _cache_config
from tests.engine.conftest import tiny_overrides

N, VIEWS, DIM, SHARD = 15, 2, 32, 4


def _config(root, tmp_path, *extra):
    return _cache_config(root, tmp_path, f"cache.views={VIEWS}", *extra)


# -- helpers -------------------------------------------------------------------------------------------------------
def _contents(folder):
    """Every file of a cache folder, by path relative to it (the lock file names its latest holder: bookkeeping)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _differing(folder, reference):
    """The paths whose bytes differ between ``folder`` and the reference cache (missing or extra ones included)."""
    mine = _contents(folder)
    return sorted(p for p in set(mine) | set(reference.files) if mine.get(p) != reference.files.get(p))


def _file(folder, s, name):
    return folder / SHARDS / f"{s:05d}" / (name if name.endswith(".json") else f"{name}.npy")


def _truncate(path, by=100):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - by)
    return size - by


def _flip_byte(path, row, within=5):
    """Flip one byte inside row ``row`` of a .npy file: the size and the header stay as they were."""
    m = np.load(path, mmap_mode="r")
    offset = m.offset + row * m[0].nbytes + within
    del m
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _edit_meta(folder, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    atomic_write_json(folder / "meta.json", meta)


def _unfinish(folder, *missing):
    """Turn a complete cache into the one a build killed before shards ``missing`` were written leaves behind."""
    for s in missing:
        shutil.rmtree(folder / SHARDS / f"{s:05d}")

    def incomplete(meta):
        meta["complete"] = False
        del meta["shards"]

    _edit_meta(folder, incomplete)


def _count_rows(monkeypatch):
    """Count the image views the live teacher computes from now on."""
    counted = {"n": 0}
    original = LiveTeacherSource.forward

    def counting(self, batch, keys):
        counted["n"] += batch["image"].shape[0]
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", counting)
    return counted


def _rebuilding(config):
    return {**config, "cache": {**config["cache"], "rebuild": True}}


def _open_or_build(env, config=None, **kwargs):
    """The engine's open_or_build_cache, with the module's teacher (loaded once)."""
    return open_or_build_cache(env.config if config is None else config, env.data, env.teacher, **kwargs)


def _build(env, *, rebuild=False):
    """TeacherCache.build exactly as the engine calls it (so build's own refusals are tested, not the engine's)."""
    config, data, teacher = env.config, env.data, env.teacher
    settings = teacher_cache_settings(config)
    train, templates = data.train_pool, list(config["data"]["templates"])
    record = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                          views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    return TeacherCache.build(
        settings["dir"], record, train, data.augment, source, teacher.class_embeddings(train.classes, templates),
        teacher.identity, embed_dim=teacher.embed_dim, learned_logit_scale=float(teacher.model.logit_scale.exp()),
        batch_size=int(settings.get("batch_size", 64)), rebuild=rebuild, progress=False,
        shard_size=settings.get("shard_size"),
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The module builds about twenty caches of 15 tiny images: torch's second thread only waits on the first there
    (on a busy machine a build took 0.8-4 s with 2 threads, 0.2 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One complete cache, built once for the module, and every file it holds."""
    root = tmp_path_factory.mktemp("reference")
    config = _config(data, root)
    datamodule = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, datamodule)
    assert cache is not None and cache.meta["complete"]
    assert (cache.meta["num_samples"], cache.meta["shard_size"], cache.meta["num_shards"]) == (N, SHARD, 4)
    return SimpleNamespace(folder=cache.folder, meta=cache.meta, files=_contents(cache.folder),
                           teacher=load_teacher(config, classes=datamodule.train_pool.classes),
                           embeds=stored_array(cache.folder, "embeds"), params=stored_array(cache.folder, "params"))


@pytest.fixture
def fresh(data, tmp_path, reference):
    """A config, data module and teacher whose cache folder (tmp_path/cache) does not exist yet."""
    config = _config(data, tmp_path)
    return SimpleNamespace(config=config, data=PandDataModule(config["data"], seed=0), folder=tmp_path / "cache",
                           teacher=reference.teacher)


@pytest.fixture
def built(reference, fresh):
    """A copy of the reference cache where ``fresh`` builds its cache: complete, undamaged."""
    shutil.copytree(reference.folder, fresh.folder)
    return fresh


def _assert_same_as_reference(folder, reference):
    TeacherCache.open(folder, verify="full")
    assert _differing(folder, reference) == []


# -- open() refuses damaged files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["embeds", "params"])
def test_truncated_array_is_refused_naming_its_shard_file(built, name):
    path = _file(built.folder, 1, name)
    expected = path.stat().st_size
    size = _truncate(path)
    with pytest.raises(CacheDamagedError) as err:
        TeacherCache.open(built.folder)
    message = str(err.value)
    assert f"shards/00001/{name}.npy is {size:,} bytes, expected {expected:,}: truncated" in message
    assert str(built.folder) in message and "cache.rebuild=true" in message and "pand cache build" in message
    assert isinstance(err.value, PandError) and not isinstance(err.value, MismatchError)


def test_array_cut_short_after_open_is_named_when_its_shard_is_mapped(built):
    # A cache opened before the damage (a long run) names the file instead of failing inside numpy's mmap.
    cache = TeacherCache.open(built.folder)
    path = _file(built.folder, 2, "embeds")
    _truncate(path, by=path.stat().st_size // 2)
    cache.embeds(torch.tensor([0]), torch.tensor([0]))  # shard 0 is whole
    with pytest.raises(CacheDamagedError, match=r"shards/00002/embeds\.npy is .* bytes, expected .*: truncated"):
        cache.embeds(torch.tensor([9]), torch.tensor([0]))


def _refused_then_restored(folder, path, damage, pattern):
    """``damage(path)`` makes opening the cache fail with ``pattern``; the file is then put back as it was."""
    kept = path.read_bytes()
    damage(path)
    with pytest.raises(CacheDamagedError, match=pattern):
        TeacherCache.open(folder)
    path.write_bytes(kept)


def test_longer_file_wrong_header_and_missing_file_are_refused_naming_the_shard_file(built):
    def refused(path, damage, pattern):
        _refused_then_restored(built.folder, path, damage, pattern)
        TeacherCache.open(built.folder)

    p = built.data.augment.num_params
    refused(_file(built.folder, 1, "params"), lambda f: f.write_bytes(f.read_bytes() + b"\0" * 8),
            r"shards/00001/params\.npy is .* bytes, expected .*: longer than its header says")
    refused(_file(built.folder, 1, "params"), lambda f: np.save(f, np.zeros((SHARD, VIEWS, 2), np.float32)),
            rf"shards/00001/params\.npy holds float32 \[4, {VIEWS}, 2\], meta.json expects float32 \[4, {VIEWS}, {p}\]")
    # the last shard holds the 3 rows left over, not a whole shard's 4
    refused(_file(built.folder, 3, "params"), lambda f: np.save(f, np.zeros((SHARD, VIEWS, p), np.float32)),
            rf"shards/00003/params\.npy holds float32 \[4, {VIEWS}, {p}\], meta.json expects float32 \[3, {VIEWS}, "
            rf"{p}\]")
    refused(_file(built.folder, 1, "embeds"), lambda f: f.write_bytes(b"garbage"),
            r"shards/00001/embeds\.npy has no readable \.npy header")
    refused(_file(built.folder, 2, "digests"), lambda f: f.unlink(), r"shards/00002/digests\.npy is missing")


@pytest.mark.parametrize("name", ["embeds", "params"])
def test_byte_flipped_in_place_is_refused_naming_the_shard_file_row_and_image(built, name):
    _flip_byte(_file(built.folder, 2, name), 1)
    with pytest.raises(CacheDamagedError) as err:
        TeacherCache.open(built.folder)
    assert (f"shards/00002/{name}.npy row 1 (image 9) does not match its checksum in digests.npy (1 of 4 rows "
            "checked differ)") in str(err.value)


def test_sampled_verification_always_checks_the_first_and_last_rows(built, monkeypatch):
    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 2)
    rows = integrity.sample_rows(N, 10**9, "auto")
    assert len(rows) <= 4 and rows[0] == 0 and rows[-1] == N - 1
    assert list(integrity.sample_rows(N, 10**9, "full")) == list(range(N))
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 0)  # the first and the last row, nothing else
    assert list(integrity.sample_rows(N, 10**9, "auto")) == [0, N - 1]
    TeacherCache.open(built.folder, verify="sample")

    _flip_byte(_file(built.folder, 1, "embeds"), 2)  # a row the sample does not draw goes unseen...
    TeacherCache.open(built.folder)
    with pytest.raises(CacheDamagedError, match=r"shards/00001/embeds\.npy row 2 \(image 6\)"):
        TeacherCache.open(built.folder, verify="full")  # ...until every row is checked
    _flip_byte(_file(built.folder, 1, "embeds"), 2)  # flipped back

    # a shard none of whose rows is drawn still has its digests checked against meta.json
    _flip_byte(_file(built.folder, 2, "digests"), 0)
    with pytest.raises(CacheDamagedError, match=r"shards/00002/digests\.npy does not match its checksum in meta"):
        TeacherCache.open(built.folder)
    _flip_byte(_file(built.folder, 2, "digests"), 0)

    for s, row, image in [(3, 2, N - 1), (0, 0, 0)]:
        _flip_byte(_file(built.folder, s, "embeds"), row)
        pattern = rf"shards/0000{s}/embeds\.npy row {row} \(image {image}\) does not match its checksum in digests"
        with pytest.raises(CacheDamagedError, match=pattern + r"\.npy \(1 of 1 rows checked differ\)"):
            TeacherCache.open(built.folder, verify="sample")
        _flip_byte(_file(built.folder, s, "embeds"), row)
    TeacherCache.open(built.folder, verify="full")


def test_damaged_small_files_are_refused_naming_them(built):
    def refused(path, damage, pattern):
        _refused_then_restored(built.folder, path, damage, pattern)

    refused(_file(built.folder, 0, "digests"), lambda f: _flip_byte(f, 0),
            r"shards/00000/digests\.npy does not match its checksum in meta\.json")
    refused(_file(built.folder, 2, "shard.json"), lambda f: f.write_text("{"),
            r"shards/00002/shard\.json cannot be read")
    refused(_file(built.folder, 2, "shard.json"), lambda f: f.write_text(json.dumps({"shard": 2, "rows": [0, 4]})),
            r"shards/00002/shard\.json holds rows \[0, 4\], expected \[8, 12\]")
    TeacherCache.open(built.folder)

    text = built.folder / "text.safetensors"
    data = bytearray(text.read_bytes())
    data[-3] ^= 0xFF
    text.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match=r"text\.safetensors does not match its checksum in meta\.json"):
        TeacherCache.open(built.folder)
    text.write_bytes(bytes(data[:100]))
    with pytest.raises(CacheDamagedError, match=r"text\.safetensors cannot be read"):
        TeacherCache.open(built.folder)


@pytest.mark.parametrize("content", ["cut", "empty", "list"])
def test_garbled_meta_json_is_a_clear_refusal_not_a_decoder_traceback(built, content):
    meta = built.folder / "meta.json"
    text = meta.read_text()
    meta.write_text({"cut": text[: len(text) // 2], "empty": "", "list": "[1, 2]"}[content])
    with pytest.raises(CacheDamagedError) as err:
        TeacherCache.open(built.folder)
    assert not isinstance(err.value, json.JSONDecodeError) and err.value.__cause__ is None
    message = str(err.value)
    assert f"the teacher cache at {built.folder} is damaged: meta.json " in message
    expected = {"cut": "not valid JSON (", "empty": "empty: it was cut short", "list": "holds a JSON list"}[content]
    assert expected in message and "cache.rebuild=true" in message


def test_complete_cache_missing_a_shard_or_whose_shard_checksum_differs_is_refused_naming_the_shard(built):
    folder, shards = built.folder, built.folder / SHARDS

    def refused(pattern):
        with pytest.raises(CacheDamagedError, match=pattern):
            TeacherCache.open(folder)

    (shards / "00002").rename(shards / "away")
    refused(r"shards/00002 is missing")
    (shards / "away").rename(shards / "00002")

    # shards 1 and 2 swapped whole: their records hold the other rows
    (shards / "00001").rename(shards / "away")
    (shards / "00002").rename(shards / "00001")
    (shards / "away").rename(shards / "00002")
    refused(r"shards/00001/shard\.json holds rows \[8, 12\], expected \[4, 8\]")
    # ... and with their records swapped back: meta.json's checksum of each shard's digests tells them apart
    one, two = _file(folder, 1, "shard.json"), _file(folder, 2, "shard.json")
    kept = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(kept)
    refused(r"shards/00001/digests\.npy does not match its checksum in meta\.json")


def test_meta_json_shard_entries_that_disagree_are_refused_naming_the_shard(built, reference):
    _edit_meta(built.folder, lambda meta: meta["shards"].update({"00002": meta["shards"]["00001"]}))
    with pytest.raises(CacheDamagedError, match=r"shards/00002/digests\.npy does not match its checksum in meta"):
        TeacherCache.open(built.folder)
    _edit_meta(built.folder, lambda meta: meta["shards"].pop("00002"))
    with pytest.raises(CacheDamagedError, match=r"meta\.json has no checksum of shards/00002/digests\.npy"):
        TeacherCache.open(built.folder)
    _edit_meta(built.folder, lambda meta: meta.update(shards=sorted(reference.meta["shards"])))
    with pytest.raises(CacheDamagedError, match=r"meta\.json's shards is a JSON list, not an object"):
        TeacherCache.open(built.folder)
    _edit_meta(built.folder, lambda meta: meta.update(num_shards=5, shards=reference.meta["shards"]))
    with pytest.raises(CacheDamagedError, match=r"num_shards=5 disagrees with num_samples=15 and shard_size=4"):
        TeacherCache.open(built.folder)


@pytest.mark.parametrize("version", [1, 3])
def test_cache_of_an_older_format_version_is_refused_as_made_for_something_else(built, version):
    def older(meta):
        meta["version"] = version
        if version == 1:
            del meta["arrays"]

    _edit_meta(built.folder, older)
    with pytest.raises(MismatchError, match=rf"version: stored {version}, expected {teacher_mod.FORMAT_VERSION}"):
        TeacherCache.open(built.folder)
    with pytest.raises(MismatchError, match=rf"version: stored {version}, expected {teacher_mod.FORMAT_VERSION}"):
        _open_or_build(built)


def _as_format_3(folder, reference):
    """The same rows laid out as format version 3 wrote them: one array of each kind, done.npy, no shards."""
    arrays = {"params": reference.params, "embeds": reference.embeds, "digests": stored_array(folder, "digests"),
              "done": np.ones(N, bool)}
    shutil.rmtree(folder / SHARDS)
    for name, values in arrays.items():
        np.save(folder / f"{name}.npy", values)

    def version_3(meta):
        meta.update(version=3, arrays={name: {"shape": list(values.shape), "dtype": values.dtype.str}
                                       for name, values in arrays.items()})
        meta["checksums"]["digests.npy"] = "0" * 32
        for key in ("shards", "shard_size", "num_shards"):
            del meta[key]

    _edit_meta(folder, version_3)


def test_cache_of_format_version_3_is_refused_then_rebuilt_in_shards(built, reference):
    _as_format_3(built.folder, reference)
    with pytest.raises(MismatchError, match=rf"version: stored 3, expected {teacher_mod.FORMAT_VERSION}") as err:
        _open_or_build(built)
    assert "cache.rebuild=true" in str(err.value)
    cache = _open_or_build(built, _rebuilding(built.config))
    assert cache.meta["version"] == teacher_mod.FORMAT_VERSION
    assert not list(built.folder.glob("*.npy"))  # format 3's arrays are gone with it
    _assert_same_as_reference(built.folder, reference)


# -- build: refuse or repair a damaged cache -----------------------------------------------------------------------
def _damage(folder, how):
    if how == "truncated embeds":
        _truncate(_file(folder, 1, "embeds"))
    elif how == "truncated params":
        _truncate(_file(folder, 3, "params"))
    elif how == "flipped embeds":
        _flip_byte(_file(folder, 2, "embeds"), 3)
    elif how == "garbled meta":
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text[:40])
    elif how == "missing digests":
        _file(folder, 0, "digests").unlink()
    elif how == "missing shard":
        shutil.rmtree(folder / SHARDS / "00003")


DAMAGES = ["truncated embeds", "truncated params", "flipped embeds", "garbled meta", "missing digests",
           "missing shard"]


@pytest.mark.parametrize("how", DAMAGES)
def test_build_with_rebuild_repairs_a_damaged_complete_cache(built, reference, how, caplog):
    _damage(built.folder, how)
    with pytest.raises(CacheDamagedError):
        TeacherCache.open(built.folder)
    with caplog.at_level(logging.WARNING, logger="pand"):
        cache = _open_or_build(built, _rebuilding(built.config))
    assert cache is not None and cache.meta["complete"]
    assert f"rebuilding the teacher cache at {built.folder}: it is damaged" in caplog.text
    _assert_same_as_reference(built.folder, reference)  # opens clean, and holds what a fresh build holds


@pytest.mark.parametrize("how", DAMAGES)
def test_build_without_rebuild_refuses_a_damaged_complete_cache(built, how):
    _damage(built.folder, how)
    before = _contents(built.folder)
    with pytest.raises(CacheDamagedError, match="cache.rebuild=true"):
        _build(built, rebuild=False)
    with pytest.raises(CacheDamagedError):  # the engine's path: open, then build
        _open_or_build(built)
    assert _contents(built.folder) == before  # never silently overwritten


def test_build_with_rebuild_over_a_damaged_cache_calls_build_directly(built, reference):
    _truncate(_file(built.folder, 0, "embeds"))
    cache = _build(built, rebuild=True)
    assert cache.meta["complete"]
    _assert_same_as_reference(built.folder, reference)


def test_pand_cache_build_never_calls_a_damaged_cache_complete(built, reference, data, tmp_path, capsys):
    overrides = tiny_overrides(data, tmp_path / "run", f"cache.dir={built.folder}", f"cache.views={VIEWS}",
                               "cache.batch_size=4", f"cache.shard_size={SHARD}")
    capsys.readouterr()
    assert main(["cache", "build", *overrides]) == 0  # the settings of the cache: it is kept
    assert "teacher cache complete" in capsys.readouterr().err
    _truncate(_file(built.folder, 0, "embeds"))
    assert main(["cache", "build", *overrides]) != 0
    err = capsys.readouterr().err
    assert "shards/00000/embeds.npy is" in err and "truncated" in err and "cache.rebuild=true" in err
    assert main(["cache", "build", *overrides, "cache.rebuild=true"]) == 0
    _assert_same_as_reference(built.folder, reference)


def test_a_build_that_fails_its_final_verification_is_not_marked_complete(built, monkeypatch):
    _unfinish(built.folder, 3)
    real = teacher_build.verify_cache

    def disk_loses_the_tail(folder, meta, verify="auto", rows=True):
        if meta.get("complete"):
            _truncate(_file(folder, 3, "embeds"))
        return real(folder, meta, verify, rows)

    monkeypatch.setattr(teacher_build, "verify_cache", disk_loses_the_tail)
    with pytest.raises(CacheDamagedError, match=r"shards/00003/embeds\.npy is .*: truncated \(found when verifying "
                                                "the cache just built, which is left incomplete"):
        _open_or_build(built)
    meta = json.loads((built.folder / "meta.json").read_text())
    assert meta["complete"] is False and "shards" not in meta
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(built.folder)


# -- interrupted builds resume -------------------------------------------------------------------------------------
def test_interrupted_build_keeps_its_finished_shards_and_resumes_to_the_same_bytes(fresh, reference, monkeypatch):
    original = LiveTeacherSource.forward
    calls = {"n": 0}

    def dies(self, batch, keys):
        calls["n"] += 1
        if calls["n"] > 2 * VIEWS:  # the views of shards 0 and 1 (one chunk each), then "killed"
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", dies)
    with pytest.raises(KeyboardInterrupt):
        _open_or_build(fresh)
    monkeypatch.setattr(LiveTeacherSource, "forward", original)
    assert finished_rows(fresh.folder) == 2 * SHARD
    assert sorted(p.name for p in (fresh.folder / SHARDS).iterdir()) == ["00000", "00001"]  # no partial shard
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(fresh.folder)
    counted = _count_rows(monkeypatch)
    cache = _open_or_build(fresh)
    assert cache.meta["complete"] and counted["n"] == (N - 2 * SHARD) * VIEWS  # only the missing shards
    _assert_same_as_reference(fresh.folder, reference)


@pytest.mark.parametrize("how", ["digests altered", "shard.json altered", "row altered"])
def test_resume_builds_again_a_finished_shard_that_no_longer_matches_its_record(built, reference, monkeypatch,
                                                                                 caplog, how):
    _unfinish(built.folder, 3)
    if how == "digests altered":  # digests.npy no longer matches the checksum in shard.json
        _flip_byte(_file(built.folder, 1, "digests"), 2)
    elif how == "shard.json altered":
        record = _file(built.folder, 1, "shard.json")
        record.write_text(json.dumps({**json.loads(record.read_text()), "digests": "0" * 32}))
    else:  # a row no longer matches its digest
        _flip_byte(_file(built.folder, 1, "embeds"), 2)
    counted = _count_rows(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pand"):
        cache = _open_or_build(built)
    assert cache.meta["complete"]
    assert f"the teacher cache at {built.folder}: finished shard 00001 is damaged (" in caplog.text
    assert "building it again" in caplog.text
    assert counted["n"] == (SHARD + 3) * VIEWS  # shard 1 again and shard 3; shards 0 and 2 were kept
    _assert_same_as_reference(built.folder, reference)


def test_interrupted_build_with_a_truncated_shard_is_refused_unless_rebuilt(built, reference):
    _unfinish(built.folder, 2, 3)
    _truncate(_file(built.folder, 0, "params"))
    with pytest.raises(CacheDamagedError, match=r"shards/00000/params\.npy is .*: truncated"):
        _open_or_build(built)
    cache = _open_or_build(built, _rebuilding(built.config))
    assert cache.meta["complete"]
    _assert_same_as_reference(built.folder, reference)


def test_a_partial_shard_left_by_a_killed_build_is_never_read_and_removed_by_the_next_build(built, reference,
                                                                                            monkeypatch):
    shards = built.folder / SHARDS
    partial = shards / ".00001.partial-123"  # a shard a killed process 123 was writing: looks whole, is not
    shutil.copytree(shards / "00001", partial)
    _flip_byte(partial / "embeds.npy", 0)
    cache = TeacherCache.open(built.folder, verify="full")  # a complete cache: never looked at
    np.testing.assert_array_equal(cache.embeds(torch.tensor([4]), torch.tensor([0])).numpy(),
                                  reference.embeds[4, 0].astype(np.float32)[None])

    _unfinish(built.folder, 1)
    assert finished_rows(built.folder) == N - SHARD
    np.testing.assert_array_equal(stored_array(built.folder, "embeds"),
                                  np.delete(reference.embeds, range(SHARD, 2 * SHARD), axis=0))
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(built.folder)
    counted = _count_rows(monkeypatch)
    _open_or_build(built)
    assert counted["n"] == SHARD * VIEWS  # shard 1 was computed, not taken from the partial folder
    assert not partial.exists()
    _assert_same_as_reference(built.folder, reference)


# -- readers and processes -----------------------------------------------------------------------------------------
def test_a_reader_maps_only_the_shards_its_rows_fall_into(built, reference):
    cache = TeacherCache.open(built.folder)
    assert cache.opened_shards == []  # open() verifies, it does not keep maps
    _truncate(_file(built.folder, 3, "embeds"))  # a shard this reader never reads
    index, views = torch.tensor([8, 11, 9]), torch.tensor([0, 1, 1])
    got = cache.embeds(index, views)
    assert cache.opened_shards == [2]
    np.testing.assert_array_equal(got.numpy(), reference.embeds[[8, 11, 9], [0, 1, 1]].astype(np.float32))
    torch.testing.assert_close(cache.params(0, 1), torch.from_numpy(reference.params[0, 1]), rtol=0, atol=0)
    assert cache.opened_shards == [0, 2]
    assert pickle.loads(pickle.dumps(cache)).opened_shards == []  # a worker process maps its own


def test_two_processes_build_the_same_bytes_as_one(fresh, reference):
    assert _open_or_build(fresh, rank=0, world_size=2) is None  # its half only
    assert sorted(p.name for p in (fresh.folder / SHARDS).iterdir()) == ["00000", "00002"]
    cache = _open_or_build(fresh, rank=1, world_size=2)
    assert cache is not None and cache.meta["complete"]
    _assert_same_as_reference(fresh.folder, reference)  # every shard file, text.safetensors and meta.json


# -- disk space ----------------------------------------------------------------------------------------------------
def test_too_little_free_space_is_refused_before_any_shard_exists(fresh, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    with pytest.raises(OutputError) as err:
        _open_or_build(fresh)
    monkeypatch.setattr(shutil, "disk_usage", real)
    rows = row_layout(VIEWS, fresh.data.augment.num_params, DIM)
    needed = 3 * shard_bytes(rows, SHARD) + shard_bytes(rows, N - 3 * SHARD) + 3 * DIM * 4 + integrity.SLACK_BYTES
    message = str(err.value)
    assert f"not enough free space for the teacher cache at {fresh.folder}: it needs {needed:,} bytes" in message
    assert "but only 1,000 bytes are free there" in message
    assert not (fresh.folder / SHARDS).exists() and not (fresh.folder / "meta.json").exists()


class _Proxy:
    """A module whose attributes are the real module's, but for the ones given."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


@pytest.mark.parametrize(("code", "where"), [(errno.ENOSPC, "save"), (errno.EDQUOT, "fsync")])
def test_full_disk_while_a_shard_is_written_names_the_shard_and_leaves_no_partial_shard(fresh, reference, monkeypatch,
                                                                                         code, where):
    written = []

    def save(f, array, **kwargs):
        written.append(f.name)
        if where == "save" and ".00002.partial-" in f.name and f.name.endswith("embeds.npy"):
            raise OSError(code, os.strerror(code))
        return np.save(f, array, **kwargs)

    def fsync(fd):  # a network file system may report a full disk only when the data is flushed
        if where == "fsync" and ".00002.partial-" in written[-1] and written[-1].endswith("embeds.npy"):
            raise OSError(code, os.strerror(code))
        return os.fsync(fd)

    monkeypatch.setattr(layout, "np", _Proxy(np, save=save))
    monkeypatch.setattr(layout, "os", _Proxy(os, fsync=fsync))
    with pytest.raises(OutputError) as err:
        _open_or_build(fresh)
    reason = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    nbytes = shard_bytes(reference.meta["arrays"], SHARD)
    assert (f"cannot write {fresh.folder / SHARDS / '00002'} ({nbytes:,} bytes) for the teacher cache: {reason}"
            in str(err.value))
    # the shard being written is gone, partial folder and all; the shards finished before it are whole
    assert sorted(p.name for p in (fresh.folder / SHARDS).iterdir()) == ["00000", "00001"]
    for path in (fresh.folder / SHARDS).rglob("*"):
        if path.is_file():
            assert path.read_bytes() == reference.files[path.relative_to(fresh.folder).as_posix()], path
    assert json.loads((fresh.folder / "meta.json").read_text())["complete"] is False

    monkeypatch.undo()  # room again: the next build resumes from there
    counted = _count_rows(monkeypatch)
    _open_or_build(fresh)
    assert counted["n"] == (N - 2 * SHARD) * VIEWS
    _assert_same_as_reference(fresh.folder, reference)
