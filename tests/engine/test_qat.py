"""``quantize=qat``: quantization-aware distillation through the real engine, for every family of method (logits,
embeddings, stage features), from a float checkpoint, with its schedule, its resume and its refusals."""

import csv
import json

import pytest
import torch

import pand.engine.run
from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config
from pand.engine.run import build_training
from pand.errors import ConfigError, MismatchError
from pand.students.checkpoint import load_checkpoint_student
from pand.students.quantize import QuantConv2d, quantization_state
from tests.engine.conftest import tiny_overrides


@pytest.fixture
def float_ckpt(cub_root, tmp_path):
    run = tmp_path / "float"
    assert main(["train", *tiny_overrides(cub_root, run, "student=mobilenet_v2", "method=ce", "trainer.max_epochs=1",
                                          "test=false", "trainer.limit_train_batches=2")]) == 0
    return run / "checkpoints" / "best.ckpt"


# (method overrides, a loss term it logs): logits, embeddings (closed-set and open-vocabulary), stage features
FAMILIES = [
    (["method=kd"], "train/kd"),
    (["method=vl2lite"], "train/visual_kd"),
    (["method=openvocab", "method.head=conv"], "train/distill"),
    (["method=nrkd"], "train/nrkd_feat"),
    (["method=ofa"], "train/ofa_stages"),
]


@pytest.mark.parametrize(("method", "term"), FAMILIES, ids=[m[0][len("method="):] for m, _ in FAMILIES])
def test_every_method_family_trains_quantized(cub_root, tmp_path, method, term):
    run = tmp_path / "run"
    overrides = tiny_overrides(cub_root, run, "student=mobilenet_v2", "trainer.max_epochs=1", "test=false",
                               "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "quantize=qat",
                               *method)
    assert main(["train", *overrides]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    values = [float(r[term]) for r in rows if r.get(term)]
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
    student, config, _ = load_checkpoint_student(run / "checkpoints" / "last.ckpt")  # a plain student loads it
    meta = json.loads((run / "int8" / "student.json").read_text())  # and it shipped as an int8 ONNX model
    assert meta["file"] == "student.int8.onnx" and meta["quantization"]["int8_mac_share"] == 1.0
    assert config["quantize"]["name"] == "qat" and not any(isinstance(m, QuantConv2d) for m in student.modules())


def test_a_quantized_run_reads_the_teacher_cache_as_any_run_does(cub_root, tmp_path):
    """The teacher side does not change with quantize=qat: a cache built by a float run serves the quantized one."""
    cache = tmp_path / "cache"
    common = ("student=mobilenet_v2", "method=kd", "trainer.max_epochs=1", "test=false",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", f"cache.dir={cache}", "cache.views=2",
              "quantize.export=false")
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "float", *common[:-1])]) == 0
    built = sorted(p.name for p in cache.iterdir())
    run = tmp_path / "qat"
    assert main(["train", *tiny_overrides(cub_root, run, *common, "quantize=qat")]) == 0
    assert sorted(p.name for p in cache.iterdir()) == built  # read, not rebuilt
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len([r for r in rows if r.get("train/kd")]) == 2


def test_the_fine_tune_starts_from_the_float_checkpoint_and_steps_quantized(cub_root, tmp_path, float_ckpt,
                                                                             monkeypatch):
    # student.pretrained=true as in a real config: init_from replaces every weight, so none is downloaded
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "qat", "student=mobilenet_v2",
                                                      "method=kd", "quantize=qat", "student.pretrained=true",
                                                      f"init_from={float_ckpt}")))
    built = []
    real = pand.engine.run.build_student
    monkeypatch.setattr(pand.engine.run, "build_student", lambda *a, **k: built.append(k) or real(*a, **k))
    _, module = build_training(config)
    assert [(k["pretrained"], k["weights"]) for k in built] == [(False, None)]
    start, _, _ = load_checkpoint_student(float_ckpt)
    student = module.distiller.student
    for key, value in start.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value)
    assert sum(isinstance(m, QuantConv2d) for m in student.modules()) == 52
    assert quantization_state(module) is not None


def test_the_schedule_runs_float_steps_first_and_freezes_batch_norm_last(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(cub_root, run, "student=mobilenet_v2", "method=kd", "trainer.max_epochs=3",
                               "test=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                               "quantize=qat", "quantize.start_epoch=1", "quantize.freeze_bn_epochs=1",
                               "quantize.export=false")
    assert main(["train", *overrides]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pand: epoch ")]
    assert said == ["pand: epoch 0: training steps in float, BatchNorm training",
                    "pand: epoch 1: training steps quantized, BatchNorm training",
                    "pand: epoch 2: training steps quantized, BatchNorm frozen"]


def test_a_frozen_epoch_leaves_the_batch_norm_statistics_as_they_were(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    common = ("student=mobilenet_v2", "method=kd", "test=false", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "quantize=qat", "quantize.export=false")
    assert main(["train", *tiny_overrides(cub_root, run, *common, "trainer.max_epochs=1",
                                          "quantize.freeze_bn_epochs=0")]) == 0
    before = load_checkpoint_student(run / "checkpoints" / "last.ckpt")[0].state_dict()
    resumed = tiny_overrides(cub_root, run, *common, "trainer.max_epochs=2", "quantize.freeze_bn_epochs=1",
                             f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert main(["train", *resumed]) == 2  # another schedule is another training: refused on resume
    assert "quantize.freeze_bn_epochs: checkpoint 0, this run 1" in capsys.readouterr().err
    run2 = tmp_path / "run2"
    assert main(["train", *tiny_overrides(cub_root, run2, *common, "trainer.max_epochs=1",
                                          "quantize.freeze_bn_epochs=1")]) == 0
    after = load_checkpoint_student(run2 / "checkpoints" / "last.ckpt")[0].state_dict()
    # one epoch, frozen from its start: the statistics are the initial ones (the other run's moved)
    stats = [k for k in after if k.endswith("running_mean")]
    assert all(torch.equal(after[k], torch.zeros_like(after[k])) for k in stats)
    assert any(not torch.equal(before[k], torch.zeros_like(before[k])) for k in stats)


def test_a_resumed_quantized_run_continues_exactly(cub_root, tmp_path):
    """Stopped after its float epoch and a quantized one, the resumed run goes on exactly as an uninterrupted run
    does: the switches follow the epoch, and fake quantization keeps no state of its own."""
    common = ("student=mobilenet_v2", "method=kd", "test=false", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "quantize=qat", "quantize.start_epoch=1", "quantize.freeze_bn_epochs=0",
              "trainer.max_epochs=3", "quantize.export=false")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_overrides(cub_root, straight, *common)]) == 0
    assert main(["train", *tiny_overrides(cub_root, resumed, *common, "trainer.max_epochs=2")]) == 0
    last = resumed / "checkpoints" / "last.ckpt"
    assert main(["train", *tiny_overrides(cub_root, resumed, *common, f"ckpt_path={last}")]) == 0
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_from_another_student_is_refused(cub_root, tmp_path, float_ckpt, capsys):
    overrides = tiny_overrides(cub_root, tmp_path / "qat", "student=resnet18", "method=kd", "quantize=qat",
                               f"init_from={float_ckpt}")
    assert main(["train", *overrides]) == 2
    assert "holds a mobilenet_v2 student; this run trains a resnet18" in capsys.readouterr().err
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "qat2", "student=mobilenet_v2",
                                                      "method=openvocab", "quantize=qat",
                                                      f"init_from={float_ckpt}")))
    with pytest.raises(MismatchError, match="does not fit this run's student"):
        build_training(config)  # a linear classifier in the checkpoint, a projection head here


@pytest.mark.parametrize(("extra", "message"), [
    (["quantize=qat", "quantize.start_epoch=2", "trainer.max_epochs=2"], "no training step would run quantized"),
    (["quantize=qat", "init_from=/nowhere/best.ckpt"], "init_from='/nowhere/best.ckpt': no such file"),
    (["quantize=qat", "quantize.name=int4"], "quantize.name='int4' is not allowed"),
])
def test_bad_quantization_settings_are_refused(cub_root, tmp_path, extra, message):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", *extra)))
    with pytest.raises(ConfigError, match=message):
        validate_train_config(config)


def test_pand_train_ships_the_int8_model_and_its_test_top1(cub_root, tmp_path, float_ckpt, capsys):
    run = tmp_path / "qat"
    overrides = tiny_overrides(cub_root, run, "student=mobilenet_v2", "method=kd", "quantize=qat",
                               f"init_from={float_ckpt}", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                               "quantize.calibration=8")
    capsys.readouterr()
    assert main(["train", *overrides]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run / "summary.json").read_text())
    int8 = printed["int8"]
    assert int8["file"] == str(run / "int8" / "student.int8.onnx") and (run / "int8" / "student.onnx").is_file()
    meta = json.loads((run / "int8" / "student.json").read_text())
    assert meta["quantization"]["calibration"]["images"] == 8
    assert meta["checkpoint"]["path"] == printed["best_checkpoint"]
    assert 0.0 <= int8["test_acc1"] <= 1.0 and int8["simulated_test_acc1"] == printed["test_acc1"]
    # the number pand prints is pand eval's of the shipped file
    assert main(["eval", f"model={int8['file']}", "splits=[test]"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc1"] == int8["test_acc1"]
