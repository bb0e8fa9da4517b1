"""``data.augment_on=device``: the loader hands uint8 windows, the data module makes the views after transfer."""

import csv
import json

import pytest
import torch

from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_settings
from pand.engine.data import PandDataModule
from pand.errors import ConfigError
from tests.engine.conftest import tiny_overrides


def _modules(cub_root, tmp_path, *extra):
    cpu = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "a", *extra)))
    device = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "b", "data.augment_on=device", *extra)))
    return PandDataModule(cpu["data"], seed=3), PandDataModule(device["data"], seed=3)


def test_device_batches_carry_windows_and_become_the_cpu_views(cub_root, tmp_path):
    cpu, device = _modules(cub_root, tmp_path)
    item = device.train_dataloader().dataset[(2, 1)]
    assert "image" not in item and item["window"].dtype == torch.uint8 and item["window"].shape == (3, 32, 32)
    a, b = next(iter(cpu.train_dataloader())), next(iter(device.train_dataloader()))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["aug"], b["aug"])
    assert b["window"].dtype == torch.uint8 and "image" not in b
    made = device.on_after_batch_transfer(b, 0)
    assert "window" not in made and made["image"].shape == a["image"].shape
    assert (made["image"] - a["image"]).abs().max() < 1e-4
    # evaluation batches are untouched (the eval transform runs in the loader on both paths)
    e = next(iter(device.eval_dataloader("val")))
    assert torch.equal(device.on_after_batch_transfer(e, 0)["image"], e["image"])


def test_a_bad_augment_on_is_refused_with_the_choices(cub_root, tmp_path):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path, "data.augment_on=gpu")))
    with pytest.raises(ConfigError, match="data.augment_on"):
        validate_train_settings(config)


def _first_loss(run):
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss")]
    return float(rows[0]["train/loss"])


def test_training_with_device_views_and_a_cache_of_cpu_views(cub_root, tmp_path):
    """The cache is built from CPU views; a run making its views on the device reads it and trains the same steps."""
    cache = f"cache.dir={tmp_path / 'cache'}"
    runs = {}
    for on in ("cpu", "device"):
        run = tmp_path / on
        assert main(["train", *tiny_overrides(cub_root, run, cache, "cache.views=2", f"data.augment_on={on}",
                                              "trainer.max_epochs=1")]) == 0
        runs[on] = run
    assert json.loads((runs["device"] / "summary.json").read_text())["test_acc1"] is not None
    assert _first_loss(runs["device"]) == pytest.approx(_first_loss(runs["cpu"]), rel=1e-4)


def test_cache_build_with_device_views_stores_the_same_cache(cub_root, tmp_path):
    import numpy as np

    from pand.cache.teacher.layout import stored_array

    folders = {}
    for on, workers in (("cpu", 0), ("device", 0), ("device-workers", 2)):
        folders[on] = tmp_path / f"cache-{on}"
        overrides = tiny_overrides(cub_root, tmp_path / f"run-{on}", f"cache.dir={folders[on]}", "cache.views=3",
                                   f"data.augment_on={on.split('-')[0]}", f"cache.num_workers={workers}",
                                   "cache.batch_size=4")
        assert main(["cache", "build", *overrides]) == 0
    # loader processes change nothing: every view is a function of (seed, view, index)
    for name in ("params", "embeds", "digests"):
        assert np.array_equal(stored_array(folders["device"], name), stored_array(folders["device-workers"], name))
    cpu, device = (stored_array(folders[on], "embeds") for on in ("cpu", "device"))
    assert np.array_equal(stored_array(folders["cpu"], "params"), stored_array(folders["device"], "params"))
    # float16 rows: equal, or one rounding step apart where a value sits on a float16 boundary
    step = np.spacing(np.abs(cpu).astype(np.float16)).astype(np.float32)
    assert (np.abs(cpu.astype(np.float32) - device.astype(np.float32)) <= step).all()
    assert (cpu == device).mean() > 0.99
    # and the cache made from device views is the cache a CPU-view run opens
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "train", f"cache.dir={folders['device']}",
                                          "cache.views=3", "trainer.max_epochs=1")]) == 0


def test_a_run_may_resume_on_the_other_view_path(cub_root, tmp_path):
    """Where the views are made is operational (the same views to ~1e-6), like the loader workers: checkpoints made
    before the setting existed, or on the other path, still resume."""
    from pand.engine.checkpoints import config_differences

    before = to_plain(compose("train", tiny_overrides(cub_root, tmp_path)))
    before["data"].pop("augment_on")
    now = to_plain(compose("train", tiny_overrides(cub_root, tmp_path, "data.augment_on=device")))
    assert config_differences(before, now) == []
    now["data"]["image_size"] = 48
    assert config_differences(before, now) == ["data.image_size: checkpoint 32, this run 48"]
