"""The teacher cache: exact view replay, equivalence with the online teacher, resumable and refused when foreign."""

import json
import shutil

import numpy as np
import pytest
import torch

from pand.cache.teacher import CachedTeacherSource, TeacherCache
from pand.cache.teacher.layout import finished_rows, stored_array
from pand.cli import main
from pand.config import compose, to_plain
from pand.distillers import Progress
from pand.engine.data import PandDataModule
from pand.engine.run import build_training
from pand.engine.teacher_side import open_or_build_cache
from pand.errors import MismatchError, PandError, PrecisionError
from pand.locks import LOCK_FILE
from pand.teachers.source import LiveTeacherSource
from tests.engine.conftest import tiny_overrides


def _config(cub_root, tmp_path, *extra):
    return to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={tmp_path / 'cache'}",
                                                    "cache.views=3", "cache.batch_size=4", "cache.shard_size=4",
                                                    *extra)))


def test_cached_views_replay_exactly_and_match_the_online_teacher(cub_root, tmp_path):
    config = _config(cub_root, tmp_path)
    data, module = build_training(config)
    cache = data.teacher_cache
    assert isinstance(module.teacher_source, CachedTeacherSource)
    n = len(data.splits["train"])
    assert cache.array("embeds").shape == (n, 3, 32)
    assert json.loads((cache.folder / "meta.json").read_text())["complete"] is True

    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "labelled", "aug", "view"}
    # the student's image is rebuilt from the cached parameters of the chosen view
    views = data.train_dataloader().dataset
    i, v = int(batch["index"][0]), int(batch["view"][0])
    torch.testing.assert_close(batch["aug"][0], cache.params(i, v))
    torch.testing.assert_close(batch["image"][0], data.augment.apply(views.dataset.load_image(i), cache.params(i, v)),
                               rtol=0, atol=0)

    # loss from the cached embedding == loss with the online teacher on the replayed image, to float16 tolerance
    from pand.teachers.registry import load_teacher

    live = LiveTeacherSource(load_teacher(config), config["data"]["mean"], config["data"]["std"])
    cached_out = module.teacher_source(batch, {"image_embeds"})
    live_out = live(batch, {"image_embeds"})
    torch.testing.assert_close(cached_out["image_embeds"], live_out["image_embeds"], atol=2e-3, rtol=0)
    distiller = module.distiller.eval()
    with torch.no_grad():
        a = distiller.training_losses(batch, cached_out, Progress(1, 10)).losses
        b = distiller.training_losses(batch, live_out, Progress(1, 10)).losses
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=2e-3, abs=1e-4), key


def test_interrupted_build_is_not_complete_and_resumes(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    calls = {"n": 0}
    original = LiveTeacherSource.forward

    def dies_after_first_chunk(self, batch, keys):
        calls["n"] += 1
        if calls["n"] > 3:  # 3 views of the first chunk, then "killed"
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", dies_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        open_or_build_cache(config, data)
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(tmp_path / "cache")
    assert finished_rows(tmp_path / "cache") == 4  # the first shard is kept, the one being filled is not

    counted = {"n": 0}

    def counting(self, batch, keys):
        counted["n"] += batch["image"].shape[0]
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", counting)
    cache = open_or_build_cache(config, data)
    assert cache.meta["complete"] and finished_rows(cache.folder) == len(data.splits["train"])
    assert counted["n"] == (len(data.splits["train"]) - 4) * 3  # only the missing rows were computed


def test_cache_built_for_something_else_is_refused_with_the_reason(cub_root, tmp_path):
    build_training(_config(cub_root, tmp_path))
    with pytest.raises(MismatchError, match="teacher_spec"):
        build_training(_config(cub_root, tmp_path, "teacher.pretrained=random:1"))
    with pytest.raises(MismatchError, match="transform"):
        build_training(_config(cub_root, tmp_path, "data.augment.degrees=5"))
    with pytest.raises(MismatchError, match="views"):
        build_training(_config(cub_root, tmp_path, "cache.views=2"))
    data, _ = build_training(_config(cub_root, tmp_path, "cache.views=2", "cache.rebuild=true"))
    assert data.teacher_cache.views == 2


def test_processes_build_disjoint_shares_into_one_cache(cub_root, tmp_path):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    assert open_or_build_cache(config, data, rank=0, world_size=2) is None  # half done: not complete yet
    assert 0 < finished_rows(tmp_path / "cache") < len(data.splits["train"])
    cache = open_or_build_cache(config, data, rank=1, world_size=2)
    assert cache is not None and cache.meta["complete"]


def test_training_from_the_cache_never_loads_the_teacher(cub_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    overrides = tiny_overrides(cub_root, run, f"cache.dir={tmp_path / 'cache'}", "cache.views=2")
    assert main(["cache", "build", *overrides]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache covers the run")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    assert main(["train", *overrides]) == 0
    assert json.loads((run / "summary.json").read_text())["test_acc1"] is not None


def test_views_zero_keeps_the_online_teacher(cub_root, tmp_path):
    data, module = build_training(_config(cub_root, tmp_path, "cache.views=0"))
    assert data.teacher_cache is None and isinstance(module.teacher_source, LiveTeacherSource)


# -- low-precision builds (cache.precision) -----------------------------------------------------------------------
def _in(cub_root, folder, *extra):
    return tiny_overrides(cub_root, folder / "run", f"cache.dir={folder / 'cache'}", "cache.views=2",
                          "cache.batch_size=4", "cache.shard_size=4", *extra)


def _rel_rows(reference, other):
    reference, other = reference.astype(np.float32), other.astype(np.float32)
    return np.linalg.norm(other - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def test_bf16_cache_agrees_with_fp32_row_by_row_and_other_precisions_are_refused(cub_root, tmp_path, capsys):
    fp32_config = to_plain(compose("train", _in(cub_root, tmp_path / "fp32")))
    data = PandDataModule(fp32_config["data"], seed=0)
    reference = open_or_build_cache(fp32_config, data)
    assert "precision" not in reference.meta and "agreement" not in reference.meta  # fp32 records stay as they were

    capsys.readouterr()
    assert main(["cache", "build", *_in(cub_root, tmp_path / "bf16", "cache.precision=bf16")]) == 0
    printed = json.loads(capsys.readouterr().out)
    low = TeacherCache.open(tmp_path / "bf16" / "cache")
    stats = low.meta["agreement"]
    assert low.meta["precision"] == "bf16" and printed["precision"] == "bf16" and printed["agreement"] == stats
    assert printed["images"] == low.meta["num_samples"] and printed["outputs"].startswith("image embeddings")
    assert stats["precision"] == "bf16" and stats["rows"] == 4 and 0 < stats["max_rel_error"] <= stats["tolerance"]
    assert stats["float16_storage_rel_error"] > 0 and stats["min_cosine"] > 0.999

    # the same views, their embeddings within the tolerance of fp32's in every row (and not equal to them)
    ref_folder, low_folder = reference.folder, low.folder
    assert np.array_equal(stored_array(ref_folder, "params"), stored_array(low_folder, "params"))
    rel = _rel_rows(stored_array(ref_folder, "embeds"), stored_array(low_folder, "embeds"))
    assert rel.shape == (len(data.train_pool), 2) and 0 < rel.max() <= 0.02

    # a cache of another precision is refused like any other setting, both ways, with the reason
    with pytest.raises(MismatchError) as refused:
        open_or_build_cache(to_plain(compose("train", _in(cub_root, tmp_path / "bf16"))), data)
    assert "precision: stored 'bf16', expected None" in str(refused.value)
    assert "cache.precision=bf16" in str(refused.value)
    with pytest.raises(MismatchError, match="precision: stored None, expected 'fp16'"):
        open_or_build_cache(to_plain(compose("train", _in(cub_root, tmp_path / "fp32", "cache.precision=fp16"))), data)
    # the same precision is reused
    assert open_or_build_cache(to_plain(compose("train", _in(cub_root, tmp_path / "bf16", "cache.precision=bf16"))),
                               data).meta["agreement"] == stats


def test_a_build_refused_by_the_agreement_check_writes_nothing(cub_root, tmp_path, monkeypatch):
    strict = to_plain(compose("train", _in(cub_root, tmp_path, "cache.precision=bf16",
                                           "cache.precision_tolerance=1e-9")))
    data = PandDataModule(strict["data"], seed=0)
    folder = tmp_path / "cache"
    with pytest.raises(PrecisionError) as refused:
        open_or_build_cache(strict, data)
    assert not folder.exists() or not any(folder.iterdir())  # no cache, not even an incomplete one
    message = str(refused.value)
    assert f"the teacher cache at {folder}" in message and "tolerance cache.precision_tolerance=1e-09" in message
    measured = open_or_build_cache(to_plain(compose("train", _in(cub_root, tmp_path, "cache.precision=bf16"))),
                                   data).meta["agreement"]
    assert f"max relative L2 error {measured['max_rel_error']:.3g} > tolerance" in message

    # an interrupted build stays as it was when its resumption is refused
    shutil.rmtree(folder)
    original = LiveTeacherSource.forward
    calls = {"n": 0}

    def dies_after_first_chunk(self, batch, keys):
        calls["n"] += 1
        if calls["n"] > 3:  # the probe (bf16 + fp32) and the second view of the first chunk, then "killed"
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", dies_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        open_or_build_cache(to_plain(compose("train", _in(cub_root, tmp_path, "cache.precision=bf16"))), data)
    monkeypatch.undo()

    def content():  # the lock file names its latest holder, so it changes with every open; the cache must not
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                if p.is_file() and p.name != LOCK_FILE}

    before = content()
    assert finished_rows(folder) == 4
    with pytest.raises(PrecisionError):
        open_or_build_cache(strict, data)
    assert content() == before
