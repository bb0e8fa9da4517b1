"""Optimizers, schedules, loggers and callbacks built by class path from the run's config."""

import csv
import math
from pathlib import Path

import pytest
import torch

from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_settings
from pand.engine.builders import build_optimizer, build_scheduler, target_errors
from pand.errors import ConfigError
from tests.engine.conftest import tiny_overrides


def _lrs(scheduler_cfg, epochs, *, lr=1.0, total_steps=None, optim=None):
    """The learning rate of each interval, read as the training loop would see it (then stepped)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(optim or {"_target_": "torch.optim.SGD", "lr": lr}, [param])
    entry = build_scheduler(scheduler_cfg, optimizer, max_epochs=epochs, total_steps=total_steps or epochs)
    scheduler, rates = entry["scheduler"], []
    steps = total_steps if scheduler_cfg.get("interval") == "step" else epochs
    for i in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if hasattr(scheduler, "step_update"):  # timm, stepped as pand's module does
            scheduler.step(epoch=i + 1)
        else:
            scheduler.step()
    return rates


def _scheduler(name, *overrides):
    return to_plain(compose("train", [f"scheduler={name}", *overrides]))["scheduler"]


def test_cosine_spans_the_run_after_the_warm_up_and_ends_at_eta_min():
    rates = _lrs(_scheduler("cosine", "scheduler.warmup_epochs=2", "scheduler.eta_min=0.1"), 10)
    # warm-up: (i + 1) / (w + 1) of the rate, then the cosine from the full rate towards eta_min over 8 epochs
    assert rates[:2] == pytest.approx([1 / 3, 2 / 3])
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(8)]
    assert rates[2:] == pytest.approx(expected, abs=1e-6)


def test_pand_stage_two_cosine_is_periodic_past_t_max():
    # CosineAnnealingLR(T_max=100, eta_min=1e-5) over 300 epochs: down at 100, back up at 200, down again at 300
    cfg = _scheduler("cosine", "scheduler.T_max=100", "scheduler.eta_min=1e-5")
    rates = _lrs(cfg, 301, lr=1e-4)
    assert rates[0] == pytest.approx(1e-4) and rates[100] == pytest.approx(1e-5)
    assert rates[200] == pytest.approx(1e-4, rel=1e-4) and rates[300] == pytest.approx(1e-5, rel=1e-3)


def test_step_and_multistep_and_constant():
    assert _lrs(_scheduler("step", "scheduler.step_size=2", "scheduler.gamma=0.5"), 6) == \
        pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert _lrs(_scheduler("multistep", "scheduler.milestones=[1,3]"), 4) == pytest.approx([1, 0.1, 0.1, 0.01])
    assert _lrs(_scheduler("none"), 3) == pytest.approx([1, 1, 1])
    assert _lrs(_scheduler("none", "scheduler.warmup_epochs=1"), 3) == pytest.approx([0.5, 1, 1])


def test_a_per_step_cosine_counts_the_run_in_optimizer_steps():
    rates = _lrs(_scheduler("cosine", "scheduler.interval=step"), 2, total_steps=8)
    assert rates == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])


def test_timm_cosine_follows_timm_with_its_own_warm_up():
    from timm.scheduler import CosineLRScheduler

    cfg = _scheduler("timm_cosine", "scheduler.warmup_t=2", "scheduler.warmup_lr_init=0.01", "scheduler.lr_min=0.0")
    rates = _lrs(cfg, 10)
    reference = CosineLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), t_initial=10,
                                  warmup_t=2, warmup_lr_init=0.01, lr_min=0.0)
    assert rates == pytest.approx([reference._get_lr(e)[0] for e in range(10)])


def test_reduce_on_plateau_follows_val_acc1_and_refuses_a_warm_up():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer({"_target_": "torch.optim.SGD", "lr": 1.0}, [param])
    cfg = {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "mode": "max", "patience": 0,
           "interval": "epoch", "warmup_epochs": 0}
    entry = build_scheduler(cfg, optimizer, max_epochs=5, total_steps=5)
    assert entry["monitor"] == "val/acc1" and isinstance(entry["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    config = to_plain(compose("train", []))
    config["scheduler"] = {**cfg, "warmup_epochs": 2}
    assert any("it follows val/acc1, not a timetable" in e for e in target_errors(config))


def test_an_open_wandb_run_is_finished_before_the_result_is_printed():
    from pand.engine.builders import close_loggers

    finished = []

    class Run:
        def finish(self):
            finished.append(True)

    class WandbLogger:  # stands in for Lightning's, whose finalize() leaves the W&B run open until exit
        def __init__(self, run):
            self._experiment = run

        @property
        def experiment(self):
            return self._experiment

    close_loggers([WandbLogger(Run()), WandbLogger(None), object()])
    assert finished == [True]


def test_any_torch_optimizer_by_class_path():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer({"_target_": "torch.optim.RAdam", "lr": 3e-4, "weight_decay": 0.01}, [param])
    assert isinstance(opt, torch.optim.RAdam) and opt.param_groups[0]["weight_decay"] == 0.01


def _adamw(**extra):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    return params, build_optimizer({**to_plain(compose("train", []))["optim"], "lr": 1e-2, **extra}, params)


def test_the_default_optimizer_takes_torchs_fused_kernel_and_makes_the_same_update():
    params, fused = _adamw()
    assert fused.defaults["fused"] is True
    plain_params, plain = _adamw(fused=False)
    assert not plain.defaults["fused"]
    start = [p.detach().clone() for p in params]
    for step in range(5):
        for opt, ps in ((fused, params), (plain, plain_params)):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + torch.sin(p.detach())
            opt.step()
    for a, b, a0 in zip(params, plain_params, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - a0).abs().mean() > 1e-2  # the weights moved: five Adam steps of lr 1e-2


def test_a_set_foreach_or_a_class_without_a_fused_kernel_keeps_the_class_default():
    _, opt = _adamw(foreach=True)
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True

    class NoFusedHere(torch.optim.AdamW):  # a torch or device without the kernel refuses fused=True
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices")
            super().__init__(params, fused=fused, **kwargs)

    torch.optim.NoFusedHere = NoFusedHere
    try:
        opt = build_optimizer({"_target_": "torch.optim.NoFusedHere", "lr": 1e-3}, iter([torch.nn.Parameter(
            torch.zeros(3))]))  # a generator of parameters survives the refused first attempt
    finally:
        del torch.optim.NoFusedHere
    assert isinstance(opt, NoFusedHere) and not opt.defaults["fused"]
    assert len(opt.param_groups[0]["params"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim._target_=torch.optim.Adamw"], "torch.optim has no class 'Adamw' (did you mean torch.optim.AdamW?)"),
        (["optim=sgd", "+optim.momentun=0.8"], "takes no argument 'momentun' (did you mean 'momentum'?)"),
        (["+optim.momentum=0.9"], "optim.momentum: torch.optim.adamw.AdamW takes no argument 'momentum'"),
        (["optim._target_=torch.nn.Linear"], "optim._target_=torch.nn.Linear is not a torch.optim.Optimizer"),
        (["scheduler=cosine", "+scheduler.T_maxx=3"], "takes no argument 'T_maxx' (did you mean 'T_max'?)"),
        (["scheduler=timm_cosine", "scheduler.warmup_epochs=1"], "use its own warmup_t / warmup_lr_init"),
        (["callbacks=early_stopping", "+callbacks.early_stopping.patients=3"], "(did you mean 'patience'?)"),
        (["+logger.csv.flush=1"], "logger.csv.flush: pand.engine.csv_log.CsvMetricsLogger takes no argument 'flush'"),
    ],
)
def test_a_wrong_class_or_argument_is_refused_with_a_suggestion(overrides, message):
    errors = target_errors(to_plain(compose("train", overrides)))
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scheduler.warmup_epochs=300"], "scheduler.warmup_epochs=300 is not below trainer.max_epochs=300"),
        (["scheduler.interval=batch"], "expected one of 'epoch', 'step'"),
        (["callbacks=ema", "callbacks.ema.decay=1.5"], "callbacks.ema.decay=1.5 is not allowed"),
    ],
)
def test_engine_settings_are_checked_without_building_anything(overrides, message):
    with pytest.raises(ConfigError, match="invalid training setting") as err:
        validate_train_settings(to_plain(compose("train", overrides)))
    assert message in str(err.value)


def test_trainer_arguments_pand_sets_are_refused_from_the_command_line_and_from_config_files():
    with pytest.raises(ConfigError, match="trainer.logger is set by pand, not on the command line"):
        compose("train", ["trainer.logger=false"])
    config = to_plain(compose("train", []))
    config["trainer"]["callbacks"] = []  # a config built in Python
    with pytest.raises(ConfigError, match="trainer.callbacks is set by pand: choose callbacks with callbacks="):
        validate_train_settings(config)


def test_an_optional_logger_without_its_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("wandb") else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger wandb \(WandbLogger\) needs the wandb package: pip install "
                                          r"'pand\[wandb\]'"):
        validate_train_settings(to_plain(compose("train", ["logger=wandb"])))


def _metrics(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


@pytest.mark.slow
def test_tensorboard_writes_events_beside_metrics_csv_with_the_learning_rate(cub_root, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce", "test=false", "logger=tensorboard",
                                          "scheduler=cosine")]) == 0
    from importlib.metadata import version

    err = capsys.readouterr().err
    assert err.index(f"run folder: {run}") < err.index("parameters")  # said before training starts
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["versions"]) == {"pand", "torch", "torchvision", "lightning", "open_clip_torch", "timm"}
    assert summary["versions"]["torch"] == version("torch") and summary["versions"]["timm"] == version("timm")
    import pand

    if (Path(pand.__file__).resolve().parents[2] / ".git").exists():  # pand runs from its git checkout
        assert len(summary["git"]["commit"]) == 40
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in tags and "val/acc1" in tags and "lr-AdamW" in tags
    rates = [float(r["lr-AdamW"]) for r in _metrics(run) if r.get("lr-AdamW")]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] < rates[0]  # cosine over the 2 epochs


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stops_improving(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    # lr 0: the weights never change, so val/acc1 never improves after the first validation
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce", "test=false", "optim.lr=0",
                                          "trainer.max_epochs=10", "callbacks=early_stopping",
                                          "callbacks.early_stopping.patience=1")]) == 0
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["best_epoch"] == 0


@pytest.mark.slow
def test_logger_none_writes_no_metrics_and_still_trains(cub_root, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce", "test=false", "logger=none",
                                          "trainer.max_epochs=1")]) == 0
    assert not (run / "metrics.csv").exists() and (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ema_callback_changes_the_weights_that_are_evaluated(cub_root, tmp_path, capsys):
    """The same run with and without callbacks=ema: same raw training, different evaluated (best) weights."""
    from pand.checkpoint_files import read_checkpoint

    plain, ema = tmp_path / "plain", tmp_path / "ema"
    assert main(["train", *tiny_overrides(cub_root, plain, "method=ce", "test=false", "trainer.max_epochs=1")]) == 0
    assert main(["train", *tiny_overrides(cub_root, ema, "method=ce", "test=false", "trainer.max_epochs=1",
                                          "callbacks=ema", "callbacks.ema.decay=0.5")]) == 0
    a = read_checkpoint(plain / "checkpoints" / "best.ckpt")["state_dict"]
    b = read_checkpoint(ema / "checkpoints" / "last.ckpt")
    # the raw weights of the EMA run are those of the plain run; what is evaluated and saved as best is the average
    raw = b["current_model_state"]
    assert all(torch.equal(a[k], raw[k]) for k in a if k.startswith("distiller.student.") and "num_batches" not in k)
    best = read_checkpoint(ema / "checkpoints" / "best.ckpt")["state_dict"]
    assert any(not torch.equal(a[k], best[k]) for k in a if k.startswith("distiller.student."))
