"""The teacher cache refuses damaged files with the file and the reason, repairs them on request, and never dies of a
full disk mid-build: truncated / altered arrays, a garbled meta.json, too little free space, ENOSPC at allocation."""

import errno
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pand.cache.integrity as integrity
import pand.cache.teacher as teacher_mod
import pand.cache.teacher.build as teacher_build
from pand.cache.integrity import CacheDamagedError, allocate_npy, array_layout
from pand.cache.teacher import TeacherCache, cache_record
from pand.cli import main
from pand.config import teacher_cache_settings
from pand.engine.data import PandDataModule
from pand.engine.teacher_side import (
    open_or_build_cache,
    teacher_spec,
)
from pand.errors import MismatchError, OutputError, PandError
from pand.locks import LOCK_FILE
from pand.teachers.registry import load_teacher
from pand.teachers.source import LiveTeacherSource
from tests.cache.test_teacher_cache import _config
from tests.engine.conftest import tiny_overrides

ARRAY_FILES = ("params.npy", "embeds.npy", "done.npy", "digests.npy")


# -- helpers -------------------------------------------------------------------------------------------------------
def _build(config, data, *, rebuild=False):
    """TeacherCache.build exactly as the engine calls it (so build's own refusals are tested, not the engine's)."""
    settings = teacher_cache_settings(config)
    train, templates = data.splits["train"], list(config["data"]["templates"])
    record = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                          views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates)
    teacher = load_teacher(config)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    return TeacherCache.build(
        settings["dir"], record, train, data.augment, source, teacher.class_embeddings(train.classes, templates),
        teacher.identity, embed_dim=teacher.embed_dim, learned_logit_scale=float(teacher.model.logit_scale.exp()),
        batch_size=int(settings.get("batch_size", 64)), rebuild=rebuild, progress=False,
    )


@pytest.fixture
def built(cub_root, tmp_path):
    """A complete tiny cache (3 views), its config and data module, and a copy of its arrays as first built."""
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    assert cache is not None and cache.meta["complete"]
    original = {name: np.load(cache.folder / f"{name}.npy").copy() for name in ("params", "embeds")}
    return SimpleNamespace(config=config, data=data, folder=cache.folder, cache=cache, original=original)


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


def _assert_same_as_first_build(env):
    cache = TeacherCache.open(env.folder, verify="full")
    for name, values in env.original.items():
        np.testing.assert_array_equal(np.load(env.folder / f"{name}.npy"), values)
    return cache


# -- open() refuses damaged files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["embeds.npy", "params.npy"])
def test_truncated_array_is_refused_naming_the_file(built, name):
    path = built.folder / name
    expected = path.stat().st_size
    size = _truncate(path)
    with pytest.raises(CacheDamagedError) as err:
        TeacherCache.open(built.folder)
    message = str(err.value)
    assert f"{name} is {size:,} bytes, expected {expected:,}: truncated" in message
    assert str(built.folder) in message and "cache.rebuild=true" in message and "pand cache build" in message
    assert isinstance(err.value, PandError) and not isinstance(err.value, MismatchError)


def test_array_cut_short_after_open_is_named_when_mapped(built):
    # A cache opened before the damage (a long run) names the file instead of failing inside numpy's mmap.
    cache = TeacherCache(built.folder, built.cache.meta)
    _truncate(built.folder / "embeds.npy", by=built.folder.joinpath("embeds.npy").stat().st_size // 2)
    with pytest.raises(CacheDamagedError, match=r"embeds\.npy is .* bytes, expected .*: truncated"):
        cache.embeds(torch.tensor([0]), torch.tensor([0]))


def test_longer_file_and_wrong_header_are_refused(built):
    def refused(name, damage, pattern):
        path = built.folder / name
        kept = path.read_bytes()
        damage(path)
        with pytest.raises(CacheDamagedError, match=pattern):
            TeacherCache.open(built.folder)
        path.write_bytes(kept)
        TeacherCache.open(built.folder)

    n = built.cache.meta["num_samples"]
    refused("params.npy", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
            r"params\.npy is .* bytes, expected .*: longer than its header says")
    refused("params.npy", lambda p: np.save(p, np.zeros((n, 3, 2), np.float32)),
            rf"params\.npy holds float32 \[{n}, 3, 2\], meta.json expects float32 \[{n}, 3, \d+\]")
    refused("embeds.npy", lambda p: p.write_bytes(b"garbage"), r"embeds\.npy has no readable \.npy header")
    refused("done.npy", lambda p: p.unlink(), r"done\.npy is missing")


@pytest.mark.parametrize("name", ["embeds.npy", "params.npy"])
def test_byte_flipped_in_place_is_refused_by_the_checksum(built, name):
    row = 2
    _flip_byte(built.folder / name, row)
    with pytest.raises(CacheDamagedError) as err:
        TeacherCache.open(built.folder)
    assert (f"{name} row {row} does not match its checksum in digests.npy (1 of {built.cache.meta['num_samples']} "
            "rows checked differ)") in str(err.value)


def test_sampled_verification_always_checks_the_first_and_last_rows(built, monkeypatch):
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 2)
    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 0)
    n = built.cache.meta["num_samples"]
    rows = integrity._sample_rows(n, 10**9, "auto")
    assert len(rows) <= 4 and rows[0] == 0 and rows[-1] == n - 1
    assert list(integrity._sample_rows(n, 10**9, "full")) == list(range(n))
    TeacherCache.open(built.folder, verify="sample")
    _flip_byte(built.folder / "embeds.npy", n - 1)
    with pytest.raises(CacheDamagedError, match=rf"embeds\.npy row {n - 1} does not match its checksum"):
        TeacherCache.open(built.folder, verify="sample")


def test_damaged_small_files_are_refused(built):
    digests = built.folder / "digests.npy"
    _flip_byte(digests, 0)
    with pytest.raises(CacheDamagedError, match=r"digests\.npy does not match its checksum in meta\.json"):
        TeacherCache.open(built.folder)
    _flip_byte(digests, 0)  # flipped back

    done = np.load(built.folder / "done.npy")
    done[1] = False
    np.save(built.folder / "done.npy", done)
    with pytest.raises(CacheDamagedError, match=r"done\.npy marks 1 of .* rows unwritten \(first: row 1\)"):
        TeacherCache.open(built.folder)
    done[1] = True
    np.save(built.folder / "done.npy", done)
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


def test_cache_of_format_version_1_is_refused_as_made_for_something_else(built, cub_root, tmp_path):
    meta = json.loads((built.folder / "meta.json").read_text())
    meta["version"] = 1
    del meta["arrays"]
    (built.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError, match=rf"version: stored 1, expected {teacher_mod.FORMAT_VERSION}"):
        TeacherCache.open(built.folder)
    with pytest.raises(MismatchError, match=rf"version: stored 1, expected {teacher_mod.FORMAT_VERSION}"):
        open_or_build_cache(built.config, built.data)
    cache = open_or_build_cache(_config(cub_root, tmp_path, "cache.rebuild=true"), built.data)
    assert cache.meta["version"] == teacher_mod.FORMAT_VERSION
    _assert_same_as_first_build(built)


# -- build: refuse or repair a damaged cache -----------------------------------------------------------------------
def _damage(folder, how):
    if how == "truncated embeds":
        _truncate(folder / "embeds.npy")
    elif how == "truncated params":
        _truncate(folder / "params.npy")
    elif how == "flipped embeds":
        _flip_byte(folder / "embeds.npy", 3)
    elif how == "garbled meta":
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text[:40])
    elif how == "missing digests":
        (folder / "digests.npy").unlink()


DAMAGES = ["truncated embeds", "truncated params", "flipped embeds", "garbled meta", "missing digests"]


@pytest.mark.parametrize("how", DAMAGES)
def test_build_with_rebuild_repairs_a_damaged_complete_cache(built, how, cub_root, tmp_path):
    _damage(built.folder, how)
    with pytest.raises(CacheDamagedError):
        TeacherCache.open(built.folder)
    cache = open_or_build_cache(_config(cub_root, tmp_path, "cache.rebuild=true"), built.data)
    assert cache is not None and cache.meta["complete"]
    _assert_same_as_first_build(built)  # opens clean, and holds what a fresh build holds


@pytest.mark.parametrize("how", DAMAGES)
def test_build_without_rebuild_refuses_a_damaged_complete_cache(built, how):
    _damage(built.folder, how)
    def contents():  # the lock file names its latest owner: bookkeeping, not the cache
        return {p.name: p.read_bytes() for p in built.folder.iterdir() if p.name != LOCK_FILE}

    before = contents()
    with pytest.raises(CacheDamagedError, match="cache.rebuild=true"):
        _build(built.config, built.data, rebuild=False)
    with pytest.raises(CacheDamagedError):  # the engine's path: open, then build
        open_or_build_cache(built.config, built.data)
    assert contents() == before  # never silently overwritten


def test_build_with_rebuild_over_a_damaged_cache_calls_build_directly(built):
    _truncate(built.folder / "embeds.npy")
    cache = _build(built.config, built.data, rebuild=True)
    assert cache.meta["complete"]
    _assert_same_as_first_build(built)


def test_pand_cache_build_never_calls_a_damaged_cache_complete(cub_root, tmp_path, capsys):
    overrides = tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={tmp_path / 'cache'}", "cache.views=2")
    assert main(["cache", "build", *overrides]) == 0
    _truncate(tmp_path / "cache" / "embeds.npy")
    capsys.readouterr()
    assert main(["cache", "build", *overrides]) != 0
    err = capsys.readouterr().err
    assert "embeds.npy is" in err and "truncated" in err and "cache.rebuild=true" in err
    assert main(["cache", "build", *overrides, "cache.rebuild=true"]) == 0
    TeacherCache.open(tmp_path / "cache", verify="full")


def test_a_build_that_fails_its_final_verification_is_not_marked_complete(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    real = teacher_build.verify_cache

    def disk_loses_the_tail(folder, meta, verify="auto", rows=True):
        if meta.get("complete"):
            _truncate(folder / "embeds.npy")
        return real(folder, meta, verify, rows)

    monkeypatch.setattr(teacher_build, "verify_cache", disk_loses_the_tail)
    with pytest.raises(CacheDamagedError, match=r"embeds\.npy is .*: truncated \(found when verifying the cache just"):
        open_or_build_cache(config, data)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"] is False


# -- interrupted builds still resume -------------------------------------------------------------------------------
def _interrupt_build(config, data, monkeypatch, after_calls=3):
    original = LiveTeacherSource.forward
    calls = {"n": 0}

    def dies(self, batch, keys):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", dies)
    with pytest.raises(KeyboardInterrupt):
        open_or_build_cache(config, data)
    monkeypatch.setattr(LiveTeacherSource, "forward", original)


def test_interrupted_build_resumes_and_is_verified(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    _interrupt_build(config, data, monkeypatch)
    folder = tmp_path / "cache"
    assert np.load(folder / "done.npy").sum() == 4
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(folder)
    # a row written before the interruption and altered since is computed again when the build resumes
    _flip_byte(folder / "embeds.npy", 1)
    cache = open_or_build_cache(config, data)
    assert cache.meta["complete"]
    fresh_config = _config(cub_root, tmp_path / "fresh")
    fresh = open_or_build_cache(fresh_config, PandDataModule(fresh_config["data"], seed=0))
    TeacherCache.open(folder, verify="full")
    for name in ("params", "embeds", "digests", "done"):
        np.testing.assert_array_equal(np.load(folder / f"{name}.npy"), np.load(fresh.folder / f"{name}.npy"))


def test_interrupted_build_with_a_truncated_array_is_refused_unless_rebuilt(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    _interrupt_build(config, data, monkeypatch)
    _truncate(tmp_path / "cache" / "params.npy")
    with pytest.raises(CacheDamagedError, match=r"params\.npy is .*: truncated"):
        open_or_build_cache(config, data)
    cache = open_or_build_cache(_config(cub_root, tmp_path, "cache.rebuild=true"), data)
    assert cache.meta["complete"]


# -- disk space ----------------------------------------------------------------------------------------------------
def test_too_little_free_space_is_refused_before_any_array_file_exists(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    with pytest.raises(OutputError) as err:
        open_or_build_cache(config, data)
    monkeypatch.setattr(shutil, "disk_usage", real)
    n, k = len(data.splits["train"]), 3
    layout = array_layout(n, k, data.augment.num_params, 32)
    arrays = sum(len(integrity.npy_header(s)) + integrity.data_bytes(s) for s in layout.values())
    needed = arrays + 3 * 32 * 4 + integrity.SLACK_BYTES
    message = str(err.value)
    assert f"not enough free space for the teacher cache at {tmp_path / 'cache'}: it needs {needed:,} bytes" in message
    assert "but only 1,000 bytes are free there" in message
    assert not list((tmp_path / "cache").glob("*.npy")) and not (tmp_path / "cache" / "meta.json").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_at_allocation_is_a_clear_error_naming_the_file(cub_root, tmp_path, monkeypatch, code):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:  # params.npy fits, embeds.npy does not
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OutputError) as err:
        open_or_build_cache(config, data)
    message = str(err.value)
    path = tmp_path / "cache" / "embeds.npy"
    reason = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    assert f"cannot allocate {path} (" in message and f"bytes) for the teacher cache: {reason}" in message
    # nothing half-made is left behind; the next attempt starts afresh
    assert not (tmp_path / "cache").exists()


def test_full_disk_in_the_zero_filling_fallback_is_a_clear_error(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def full(fd, offset, nbytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    monkeypatch.setattr(integrity, "_fill_zeros", full)
    with pytest.raises(OutputError, match=r"cannot allocate .*params\.npy \(.* bytes\) for the teacher cache: no "):
        open_or_build_cache(config, data)
    assert not (tmp_path / "cache").exists()


def test_the_zero_filling_fallback_builds_a_valid_cache(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    cache = open_or_build_cache(config, data)
    assert cache.meta["complete"]
    TeacherCache.open(tmp_path / "cache", verify="full")


@pytest.mark.parametrize("fallocate", [True, False])
def test_arrays_are_allocated_with_real_blocks_not_sparse(tmp_path, monkeypatch, fallocate):
    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    elif not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    spec = array_layout(64, 4, 3, 1024)["embeds"]
    path = tmp_path / "embeds.npy"
    allocate_npy(path, spec)
    m = np.load(path, mmap_mode="r")
    assert m.shape == (64, 4, 1024) and m.dtype == np.float16 and not m.any()
    data_bytes = 64 * 4 * 1024 * 2
    assert path.stat().st_size == m.offset + data_bytes
    if not hasattr(path.stat(), "st_blocks"):
        pytest.skip("no st_blocks on this platform")
    assert path.stat().st_blocks * 512 >= data_bytes  # sparse files report (almost) no blocks
