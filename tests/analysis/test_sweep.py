"""Sweeps: Hydra multirun expansion, a tiny two-run sweep end to end, and gathering run folders into a table + plot."""

import csv
import json
import logging

import pytest
from PIL import Image

from pand.analysis.sweep import expand_sweep, gather_runs, main_gather, main_sweep, run_sweep
from pand.errors import ConfigError
from tests.engine.conftest import tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_expand_sweep_grid_is_the_cartesian_product():
    combos = expand_sweep(["data=cub", "optim.lr=1e-3,2e-3", "seed=range(0,3)"])
    assert len(combos) == 6
    assert all(c[0] == "data=cub" and len(c) == 3 for c in combos)
    pairs = {(c[1], c[2]) for c in combos}
    assert pairs == {(f"optim.lr={lr}", f"seed={s}") for lr in ("0.001", "0.002") for s in (0, 1, 2)}


def test_expand_sweep_keeps_quoted_and_bracketed_commas():
    combos = expand_sweep(['data.templates=["a photo of a {}, a bird"]', 'x="a,b",c', "trainer.max_epochs=1"])
    assert len(combos) == 2
    assert [c[1] for c in combos] == ['x="a,b"', "x=c"]
    assert all(c[0] == 'data.templates=["a photo of a {}, a bird"]' and c[2] == "trainer.max_epochs=1"
               for c in combos)


def test_expand_sweep_without_sweeps_is_one_combination():
    assert expand_sweep(["a=1", "+b=2"]) == [["a=1", "+b=2"]]
    assert expand_sweep([]) == [[]]


def test_expand_sweep_rejects_a_bad_override():
    with pytest.raises(ConfigError):
        expand_sweep(["a=[1,2"])


def test_run_sweep_trains_each_value_and_writes_the_results(cub_root, tmp_path):  # noqa: F811
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(cub_root, tmp_path / "unused", "trainer.max_epochs=1")
                 if not o.startswith(("run_dir=", "optim.lr="))]
    results = run_sweep([*overrides, "optim.lr=1e-3,2e-3"], str(sweep_dir))

    assert [r["status"] for r in results] == ["ok", "ok"]
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["0-lr_0.001", "1-lr_0.002"]
    assert all((sweep_dir / r / "summary.json").is_file() for r in runs)
    assert not (tmp_path / "unused").exists()  # a run_dir override is replaced by the sweep's folders

    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2
    assert [float(r["optim.lr"]) for r in rows] == [1e-3, 2e-3]
    assert all(r["status"] == "ok" and r["test_acc1"] != "" and r["epochs"] == "1" for r in rows)
    md = (sweep_dir / "results.md").read_text()
    assert "| run | optim.lr | val_acc1 | test_acc1 | epochs | train_seconds | status |" in md
    png = sweep_dir / "results.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        im.verify()
    assert not [p for p in sweep_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_run_sweep_records_a_failed_run_and_goes_on(cub_root, tmp_path):  # noqa: F811
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(cub_root, tmp_path / "unused", "trainer.max_epochs=1", "test=false")
                 if not o.startswith(("run_dir=", "data.num_classes="))]
    # the data has 3 classes: both runs fail with a ConfigError before training, and the second is still tried; side
    # by side in two processes, each run's output in its own log
    results = run_sweep([*overrides, "data.num_classes=5,7"], str(sweep_dir), jobs=2)
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all("ConfigError" in r["error"] and "3 classes" in r["error"] for r in results)
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert [r["data.num_classes"] for r in rows] == ["5", "7"]
    assert all(r["error"] for r in rows)
    assert "| failed: ConfigError" in (sweep_dir / "results.md").read_text()
    assert all("3 classes" in (sweep_dir / f"{r}.log").read_text() for r in ("0-num_classes_5", "1-num_classes_7"))
    assert main_sweep([*overrides, "--sweep-dir", str(tmp_path / "cli"), "data.num_classes=5"]) == 1


def test_a_bad_value_in_any_combination_refuses_the_sweep_before_the_first_run(tmp_path, monkeypatch):
    def no_training(config):
        raise AssertionError("a run started")

    monkeypatch.setattr("pand.engine.run.train", no_training)
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="the sweep was not started") as err:
        run_sweep(["optim.lr=1e-3,-1", "trainer.max_epochs=1"], str(sweep_dir))
    assert "optim.lr=-1 is not allowed" in str(err.value) and "in 1 of 2 run(s)" in str(err.value)
    assert not sweep_dir.exists()


def _fake_run(folder, lr, seed, val, test):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"seed: {seed}\nrun_dir: {folder}\npaths:\n  runs_dir: {folder.parent}\n"
        f"optim:\n  name: adamw\n  lr: {lr}\ndata:\n  name: cub\n  templates: [a, b]\n"
    )
    summary = {"run_dir": str(folder), "val_acc1": val, "test_acc1": test, "epochs": 2, "train_seconds": 1.5}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_gather_runs_skips_unfinished_runs_and_finds_the_swept_key(tmp_path, caplog):
    _fake_run(tmp_path / "runs" / "a", 0.001, 0, 0.5, 0.4)
    _fake_run(tmp_path / "runs" / "b", 0.003, 0, 0.6, 0.55)
    _fake_run(tmp_path / "runs" / "c", 0.01, 0, 0.7, 0.65)
    unfinished = tmp_path / "runs" / "d"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="pand"):
        rows = gather_runs([tmp_path / "runs" / n for n in "abcd"], out)
    assert any("d" in r.getMessage() and "summary.json" in r.getMessage() for r in caplog.records)
    assert [r["run"] for r in rows] == ["a", "b", "c"]
    csv_rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(csv_rows[0])[:3] == ["run", "run_dir", "optim.lr"]  # only the swept key: not run_dir / paths.*
    assert [float(r["optim.lr"]) for r in csv_rows] == [0.001, 0.003, 0.01]
    md = (out / "results.md").read_text()
    assert "| a | 0.001 | 50.00 | 40.00 | 2 | 1.5 | ok |" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_gather_two_keys_plots_only_with_x(tmp_path, capsys):
    _fake_run(tmp_path / "runs" / "0", 0.001, 0, 0.5, 0.4)
    _fake_run(tmp_path / "runs" / "1", 0.003, 1, 0.6, 0.55)
    gather_runs([tmp_path / "runs" / "0", tmp_path / "runs" / "1"], tmp_path / "no_x")
    assert not (tmp_path / "no_x" / "results.png").exists()
    # the CLI takes a parent folder of runs
    assert main_gather([str(tmp_path / "runs"), "--out", str(tmp_path / "with_x"), "--x", "optim.lr"]) == 0
    assert (tmp_path / "with_x" / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert "optim.lr" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not a config key"):
        gather_runs([tmp_path / "runs" / "0"], tmp_path / "bad", x="optim.nope")


def test_gather_without_any_finished_run_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="summary.json"):
        gather_runs([tmp_path / "empty"], tmp_path / "out")


def test_results_csv_escapes_text_a_spreadsheet_would_run_and_keeps_numbers(tmp_path):
    import yaml

    names = ["=HYPERLINK(\"http://x\",\"y\")", "+cmd", "-x", "@SUM(A1)", "\tx", "\rx"]
    for i, name in enumerate(names):
        folder = tmp_path / "runs" / str(i)
        folder.mkdir(parents=True)
        config = {"seed": 0, "run_dir": str(folder), "data": {"name": name}, "method": {"shift": -0.5 * i}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "val_acc1": 0.5, "test_acc1": 0.5}))
    gather_runs([tmp_path / "runs" / str(i) for i in range(len(names))], tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open(newline="")))
    assert [r["data.name"] for r in rows] == ["'" + n for n in names]
    assert [r["method.shift"] for r in rows] == [str(-0.5 * i) for i in range(len(names))]  # numbers stay numbers


def test_side_by_side_runs_on_gpus_get_one_each_or_are_refused(monkeypatch):
    import torch

    from pand.analysis.sweep import _gpu_per_run
    from pand.config import compose, to_plain

    def trainers(*combos):
        return [to_plain(compose("train", combo))["trainer"] for combo in combos]

    cpu = trainers(["trainer=cpu", "seed=0"], ["trainer=cpu", "seed=1"])
    assert _gpu_per_run(cpu, 2) is None  # no GPU is looked for
    gpu_combos = [["trainer=gpu", "seed=0"], ["trainer=gpu", "seed=1"]]
    gpu = trainers(*gpu_combos)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_per_run(gpu, 2) is None  # no CUDA: the runs refuse trainer=gpu themselves, with the reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--jobs 2 runs side by side would share this machine's 1 GPU"):
        _gpu_per_run(gpu, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _gpu_per_run(gpu, 2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _gpu_per_run(gpu, 2) == ["4", "6"]  # the ids this sweep was given, not the machine's first two
    with pytest.raises(ConfigError, match="trainer.devices=2 each .* one at a time"):
        _gpu_per_run(trainers(*([*c, "trainer.devices=2"] for c in gpu_combos)), 2)
