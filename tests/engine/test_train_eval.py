"""End to end through the command line: train with a tiny teacher, select on val, test once, evaluate, resume."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from pand.cli import main
from pand.teachers.source import LiveTeacherSource
from tests.engine.conftest import tiny_overrides


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_vl2lite_trains_then_pand_eval_reproduces_the_test_accuracy(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "vl2lite" and summary["epochs"] == 2
    assert 0.0 <= summary["val_acc1"] <= 1.0 and 0.0 <= summary["test_acc1"] <= 1.0
    assert (run / "config.yaml").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("val/acc1") for r in rows) and any(r.get("train/linguistic_kd") for r in rows)

    best = run / "checkpoints" / "best.ckpt"
    ckpt = _load(best)  # weights_only: nothing in a pand checkpoint needs unpickling
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith(("distiller.student.", "distiller.image_condenser.", "distiller.text_condenser."))
                        for k in keys), keys
    assert not any("teacher" in k or "text_embeds" in k for k in keys)
    assert ckpt["hyper_parameters"]["config"]["teacher"]["model"] == "pand-tiny-vit"

    capsys.readouterr()
    assert main(["eval", f"ckpt_path={best}", "data.num_workers=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc1"] == pytest.approx(summary["test_acc1"])
    assert result["val_acc1"] == pytest.approx(summary["val_acc1"])
    assert result["test_size"] == 6
    assert (best.with_suffix(".eval.json")).is_file()


def test_resume_from_last_checkpoint_is_exact(cub_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_overrides(cub_root, straight), "test=false"]) == 0
    assert main(["train", *tiny_overrides(cub_root, resumed, "trainer.max_epochs=1"), "test=false"]) == 0
    last = resumed / "checkpoints" / "last.ckpt"
    assert _load(last)["epoch"] == 0
    assert main(["train", *tiny_overrides(cub_root, resumed), f"ckpt_path={last}", "test=false"]) == 0
    epochs_logged = {float(r["epoch"]) for r in csv.DictReader((resumed / "metrics.csv").open()) if r.get("epoch")}
    assert epochs_logged == {0.0, 1.0}  # the first part's metrics survive the resume
    a = _load(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = _load(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_random_ops_in_a_step_depend_on_neither_the_loader_nor_a_resume(cub_root, tmp_path):
    # openvocab's head has dropout: its masks come from the global generator, which the data loader also draws from
    # (differently with worker processes) and which a resumed process starts afresh.
    runs = {name: tmp_path / name for name in ("inline", "workers", "resumed")}
    opts = ("method=openvocab", "test=false")
    assert main(["train", *tiny_overrides(cub_root, runs["inline"], *opts)]) == 0
    assert main(["train", *tiny_overrides(cub_root, runs["workers"], *opts, "data.num_workers=2")]) == 0
    assert main(["train", *tiny_overrides(cub_root, runs["resumed"], *opts, "trainer.max_epochs=1")]) == 0
    last = runs["resumed"] / "checkpoints" / "last.ckpt"
    assert main(["train", *tiny_overrides(cub_root, runs["resumed"], *opts), f"ckpt_path={last}"]) == 0
    a = _load(runs["inline"] / "checkpoints" / "last.ckpt")["state_dict"]
    for other in ("workers", "resumed"):
        b = _load(runs[other] / "checkpoints" / "last.ckpt")["state_dict"]
        for k in a:
            assert torch.equal(a[k], b[k]), (other, k)


def test_teacher_runs_only_in_training_steps(cub_root, tmp_path, monkeypatch):
    calls = []
    original = LiveTeacherSource.forward

    def counting(self, batch, keys):
        calls.append(batch["image"].shape[0])
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", counting)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run)]) == 0
    train_steps = sum(1 for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss"))
    assert len(calls) == train_steps > 0  # none for the validation and test passes


def test_ce_never_loads_a_teacher(cub_root, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded for method=ce")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", "method=ce", "trainer.max_epochs=1")]) == 0


def test_class_count_mismatch_is_refused(cub_root, tmp_path, capsys):
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", "data.num_classes=7")]) == 2
    err = capsys.readouterr().err
    assert "7" in err and "3" in err


def test_existing_run_folder_is_not_overwritten(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "trainer.max_epochs=1", "test=false")]) == 0
    assert main(["train", *tiny_overrides(cub_root, run, "trainer.max_epochs=1")]) == 2
    assert "ckpt_path=" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", "data=nosuchdata"]) == 2
    assert "nosuchdata" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(cub_root, tmp_path):
    run = tmp_path / "ddp"
    overrides = tiny_overrides(cub_root, run, "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=1")
    proc = subprocess.run(
        [sys.executable, "-m", "pand", "train", *overrides], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["test_acc1"] is not None
    assert "world_size=2" in proc.stderr or "Initializing distributed: GLOBAL_RANK: 1" in proc.stderr + proc.stdout
