"""Checkpoints never lose work: last.ckpt every epoch, atomic saves, exact resumes, refused mismatches."""

import csv
import errno
import json
import os
import shutil

import pytest
import torch

from pand.checkpoint_files import read_checkpoint
from pand.cli import main
from pand.engine.checkpoints import check_resume_config
from pand.engine.module import DistillationModule
from pand.errors import CheckpointError
from tests.engine.conftest import tiny_overrides


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ce(data_root, run_dir, *extra):
    return ["train", *tiny_overrides(data_root, run_dir, "method=ce", "test=false", *extra)]


def _train_rows(run_dir):
    return [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("train/loss")]


def _same_weights(a, b):
    sa, sb = _load(a)["state_dict"], _load(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_last_ckpt_is_the_final_epoch_even_when_val_never_improves(cub_root, tmp_path):
    run = tmp_path / "run"
    # lr=0: val accuracy never changes, so only epoch 0 is an improvement
    assert main(_ce(cub_root, run, "trainer.max_epochs=3", "optim.lr=0")) == 0
    assert _load(run / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert _load(run / "checkpoints" / "best.ckpt")["epoch"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 0 and summary["status"] == "done"
    steps_before = len(_train_rows(run))

    # Resuming the finished run for one more epoch trains exactly that epoch, repeating none.
    last = run / "checkpoints" / "last.ckpt"
    assert main(_ce(cub_root, run, "trainer.max_epochs=4", "optim.lr=0", f"ckpt_path={last}")) == 0
    rows = _train_rows(run)
    assert len(rows) == steps_before + steps_before // 3
    assert sorted({int(float(r["epoch"])) for r in rows}) == [0, 1, 2, 3]
    assert _load(last)["epoch"] == 3


def test_a_save_killed_midway_leaves_the_previous_checkpoint_and_the_run_resumes_exactly(
    cub_root, tmp_path, monkeypatch, capsys
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_ce(cub_root, straight)) == 0

    real_fdopen, saves = os.fdopen, []

    class FillsUp:
        """A file on a disk that fills up after 1 MB. torch.save meets the failed write itself, and reports it as
        "RuntimeError: unexpected pos": pand must still say that the disk is full."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if self.written > 2**20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_disk_on_the_second_last_save(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if ".last.ckpt." in os.readlink(f"/proc/self/fd/{fd}"):
            saves.append(fd)
            if len(saves) == 2:
                return FillsUp(f)
        return f

    monkeypatch.setattr("pand.io.os.fdopen", full_disk_on_the_second_last_save)
    assert main(_ce(cub_root, killed)) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "last.ckpt" in err and "Traceback" not in err
    monkeypatch.setattr("pand.io.os.fdopen", real_fdopen)

    folder = killed / "checkpoints"
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 0  # the previous good file, intact
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half file left behind
    last = folder / "last.ckpt"
    assert main(_ce(cub_root, killed, f"ckpt_path={last}")) == 0
    _same_weights(straight / "checkpoints" / "last.ckpt", last)


@pytest.mark.parametrize(("workers", "every_n_steps"), [(0, 1), (2, 1), (2, 0)])
def test_a_resumed_run_trains_what_a_straight_run_trains(cub_root, tmp_path, monkeypatch, workers, every_n_steps):
    """From a mid-epoch checkpoint (every_n_steps=1: the rest of that epoch) or an end-of-epoch one, with the data
    read in this process or by loader workers (which start prefetching before Lightning sets the resumed epoch)."""
    loader = (f"data.num_workers={workers}", f"checkpoint.every_n_steps={every_n_steps}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_ce(cub_root, straight, *loader)) == 0
    steps_per_epoch = len(_train_rows(straight)) // 2
    assert steps_per_epoch >= 3

    real_step = DistillationModule.training_step

    def killed_during_step_5(self, batch, batch_idx):
        if self.global_step == steps_per_epoch + 1:  # second batch of epoch 1
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", killed_during_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        main(_ce(cub_root, killed, *loader))
    monkeypatch.setattr(DistillationModule, "training_step", real_step)
    last = killed / "checkpoints" / "last.ckpt"
    state = _load(last)
    saved_at = steps_per_epoch + 1 if every_n_steps else steps_per_epoch
    assert state["global_step"] == saved_at

    assert main(_ce(cub_root, killed, *loader, f"ckpt_path={last}")) == 0
    assert _load(last)["global_step"] == 2 * steps_per_epoch  # no batch trained twice, none skipped
    _same_weights(straight / "checkpoints" / "last.ckpt", last)


@pytest.fixture
def finished_run(cub_root, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "test=false", "optim.lr=0")]) == 0
    return run


def _resume(cub_root, run, *extra):
    return ["train", *tiny_overrides(cub_root, run, "test=false", "optim.lr=0", *extra),
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim=sgd", "optim._target_: checkpoint 'torch.optim.AdamW', this run 'torch.optim.SGD'"),
        ("scheduler=cosine", "scheduler._target_"),
        ("callbacks=ema", "callbacks.ema"),
        ("method.temperature=4.0", "method.temperature: checkpoint 2.0, this run 4.0"),
        ("student=mobilenet_v2", "student.name: checkpoint 'resnet18', this run 'mobilenet_v2'"),
        ("teacher=fmnist_clip", "teacher.model"),
        ("seed=1", "seed: checkpoint 0, this run 1"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_field(finished_run, cub_root, override, field, capsys,
                                                                monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the checkpoint was checked")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    monkeypatch.setattr("pand.engine.run.build_student", refuse)
    assert main(_resume(cub_root, finished_run, override)) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and field in err and "Traceback" not in err


def test_resume_with_another_teacher_of_the_same_name_is_refused(finished_run, cub_root, capsys):
    # Same model name and config, other weights: only the teacher's identity (weights digest) tells them apart.
    assert main(_resume(cub_root, finished_run, "teacher.pretrained=random:7")) == 2
    err = capsys.readouterr().err
    assert "teacher identity" in err


def test_resume_on_other_data_under_the_same_name_is_refused_but_moved_data_is_accepted(
    finished_run, cub_root, tmp_path, capsys
):
    from tests.fixtures.datasets import make_cub

    other = make_cub(tmp_path / "other", n_classes=3, per_class=6, test_per_class=2, size=40)
    assert main(_resume(cub_root, finished_run, f"data.root={other}")) == 2
    err = capsys.readouterr().err
    assert "data fingerprint of the train split" in err

    moved = tmp_path / "moved" / "CUB_200_2011"
    shutil.copytree(cub_root, moved)
    assert main(_resume(cub_root, finished_run, f"data.root={moved}", "trainer.max_epochs=3")) == 0


def test_resume_from_a_checkpoint_older_than_another_is_refused_unless_asked(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    opts = ("test=false", "optim.lr=0")
    assert main(["train", *tiny_overrides(cub_root, run, *opts, "trainer.max_epochs=1")]) == 0
    older = run / "checkpoints" / "epoch0.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", older)
    assert main(["train", *tiny_overrides(cub_root, run, *opts, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")]) == 0
    args = ["train", *tiny_overrides(cub_root, run, *opts), f"ckpt_path={older}"]  # epoch 0; last.ckpt is epoch 1
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "last.ckpt in the same folder is newer" in err and "checkpoint.allow_older=true" in err
    assert main([*args, "checkpoint.allow_older=true"]) == 0
    # best.ckpt holds the weights only: it is refused as a resume point with that reason
    assert main(["train", *tiny_overrides(cub_root, run, *opts), f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"]) == 2
    assert "holds weights only" in capsys.readouterr().err


def test_a_stale_last_ckpt_in_a_copied_run_folder_is_refused(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "test=false", "trainer.max_epochs=1")]) == 0
    stale = tmp_path / "epoch0.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", stale)
    last = run / "checkpoints" / "last.ckpt"
    assert main(["train", *tiny_overrides(cub_root, run, "test=false", "trainer.max_epochs=4"),
                 f"ckpt_path={last}"]) == 0
    # An old copy of the folder's checkpoint lands over the real one: the log is three epochs ahead of it.
    shutil.copy(stale, last)
    (run / "checkpoints" / "best.ckpt").unlink()
    assert main(["train", *tiny_overrides(cub_root, run, "test=false", "trainer.max_epochs=4"),
                 f"ckpt_path={last}"]) == 2
    err = capsys.readouterr().err
    assert "metrics.csv already records the validation of epoch 3" in err


class _Payload:
    """A class a weights-only load refuses: loading it would mean running code named by the file."""


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    from tests.fixtures.datasets import make_cub

    root = tmp_path_factory.mktemp("good")
    data = make_cub(root / "data", n_classes=3, per_class=6, test_per_class=2)
    assert main(["train", *tiny_overrides(data, root / "run", "method=ce", "test=false", "trainer.max_epochs=1")]) == 0
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "code"])
@pytest.mark.parametrize("command", ["eval", "train"])
def test_unreadable_checkpoints_are_refused_in_one_line(good_checkpoint, cub_root, tmp_path, damage, command, capsys):
    good = good_checkpoint
    bad = tmp_path / "bad" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x89not a checkpoint at all" * 100)
    else:
        ckpt = _load(good)
        ckpt["payload"] = _Payload()
        torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="not a readable pand checkpoint"):
        read_checkpoint(bad)
    if command == "eval":
        args = ["eval", f"ckpt_path={bad}"]
    else:
        args = ["train", *tiny_overrides(cub_root, bad.parent.parent, "test=false"), f"ckpt_path={bad}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a readable pand checkpoint" in err and "weights_only" not in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_failure_while_testing_keeps_the_training_summary(cub_root, tmp_path, monkeypatch, capsys):
    def broken_test_step(self, batch, batch_idx):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/images/x.jpg")

    monkeypatch.setattr(DistillationModule, "test_step", broken_test_step)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce")]) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "test failed" and summary["val_acc1"] is not None
    assert "Read-only" in summary["test_error"]
    assert "read-only file system: /mnt/images/x.jpg" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback(cub_root, tmp_path, monkeypatch):
    def bug(self, batch, batch_idx):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(DistillationModule, "training_step", bug)
    with pytest.raises(ZeroDivisionError):
        main(_ce(cub_root, tmp_path / "run"))


def test_a_diverged_loss_stops_training_in_one_line(cub_root, tmp_path, monkeypatch, capsys):
    from pand.distillers.base import DistillerOutput
    from pand.distillers.ce import CrossEntropy

    def diverged(self, batch, teacher, progress):
        logits = self.student(batch["image"])
        return DistillerOutput(logits, {"ce": logits.sum() * float("nan")})

    monkeypatch.setattr(CrossEntropy, "training_losses", diverged)
    assert main(_ce(cub_root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "non-finite training loss at epoch 0 step 0: ce=nan" in err and "lower optim.lr" in err


def test_a_corrupt_test_image_stops_the_run_before_training(cub_root, tmp_path, capsys):
    split = dict(line.split() for line in (cub_root / "train_test_split.txt").read_text().splitlines())
    images = dict(line.split() for line in (cub_root / "images.txt").read_text().splitlines())
    test_image = cub_root / "images" / images[next(i for i, s in split.items() if s == "0")]
    test_image.write_bytes(test_image.read_bytes()[:200])  # a JPEG cut short
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run)]) == 2
    err = capsys.readouterr().err
    assert "1 image of cub/test cannot be decoded" in err
    assert str(test_image) in err
    assert not (run / "checkpoints").exists()  # found before any epoch


def test_a_checkpoint_without_a_record_resumes_on_its_settings_alone(finished_run, cub_root):
    last = finished_run / "checkpoints" / "last.ckpt"
    ckpt = _load(last)
    del ckpt["pand"]  # as written before pand recorded data fingerprints
    torch.save(ckpt, last)
    assert main(_resume(cub_root, finished_run, "trainer.max_epochs=3")) == 0
    assert _load(last)["epoch"] == 2


def test_an_ema_run_keeps_the_average_in_its_checkpoints_and_resumes_exactly(cub_root, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    ema = ("callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=3")
    assert main(_ce(cub_root, straight, *ema)) == 0
    ckpt = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    # the average is the checkpoint's model (what eval and teacher.ckpt read); the raw weights ride along to resume
    raw = ckpt["current_model_state"]
    averaged = ckpt["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if k.startswith("distiller.student."))
    assert main(_ce(cub_root, split, "callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=2")) == 0
    assert main(_ce(cub_root, split, "callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=3",
                    f"ckpt_path={split / 'checkpoints' / 'last.ckpt'}")) == 0
    _same_weights(straight / "checkpoints" / "last.ckpt", split / "checkpoints" / "last.ckpt")


def test_best_checkpoint_holds_weights_and_record_only_and_the_ema_average(cub_root, tmp_path):
    run = tmp_path / "run"
    assert main(_ce(cub_root, run, "callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=1")) == 0
    best, last = read_checkpoint(run / "checkpoints" / "best.ckpt"), read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert "optimizer_states" in last and "current_model_state" in last
    for key in ("optimizer_states", "lr_schedulers", "callbacks", "current_model_state", "averaging_state"):
        assert key not in best, key
    assert best["pand"]["classes"] == last["pand"]["classes"] and best["hyper_parameters"] == last["hyper_parameters"]
    # One epoch: best and last are the same moment, and best holds the average, not the raw weights.
    for k, v in best["state_dict"].items():
        assert torch.equal(v, last["state_dict"][k]), k
    assert any(not torch.equal(best["state_dict"][k], last["current_model_state"][k]) for k in best["state_dict"])
    assert (run / "checkpoints" / "best.ckpt").stat().st_size < 0.6 * (run / "checkpoints" / "last.ckpt").stat().st_size
    with pytest.raises(CheckpointError, match="weights only"):
        check_resume_config(run / "checkpoints" / "best.ckpt", {})
