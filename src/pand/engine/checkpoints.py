"""Run checkpoints: when they are written, how, and what a resume checks before trusting one.

* ``last.ckpt`` is written at the end of every training epoch (and every ``checkpoint.every_n_steps`` steps when
  set), whatever validation said, with everything a resume needs; ``best.ckpt`` when ``val/acc1`` improves, with the
  weights only (no optimizer state: a third of the size with AdamW). Lightning's own ``save_last`` writes
  ``last.ckpt`` only together with a monitored checkpoint, so a resume could silently repeat every epoch since the last
  improvement; :class:`RunCheckpoints` replaces it.
* Every checkpoint goes to a temporary file beside its real name, is fsynced and renamed
  (:class:`AtomicCheckpointIO`): a kill or a full disk during a save leaves the previous file intact, and no save needs
  room in ``$TMPDIR`` (Lightning's default writer stages files there and then copies them over the real name).
* Checkpoints are read only through :func:`read_checkpoint` (``weights_only``, never unpickling code); a file that is
  empty, truncated, of another kind, or carries code is refused as "not a readable pand checkpoint".
* Each checkpoint carries a record of what it was trained on (dataset fingerprints, teacher identity, learned text
  features); :func:`check_resume` compares it, and the stored config, with the run that wants to resume, and refuses a
  checkpoint older than another checkpoint of the same folder or than the run folder's own metrics log.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from pand.checkpoint_files import RECORD_KEY, is_resumable, read_checkpoint, stored_config
from pand.errors import CheckpointError, Interrupted, MismatchError
from pand.interrupts import DeferredStop, signal_name
from pand.io import atomic_write_with, leftover_temp_files

log = logging.getLogger("pand")

# What a resume needs beyond the weights; best.ckpt leaves it out (see RunCheckpoints._save).
_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks", "current_model_state", "averaging_state")
RECORD_VERSION = 1
BEST, LAST = "best.ckpt", "last.ckpt"


# -- writing ------------------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes beside the destination and renames, and reads only weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write_with(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


class RunCheckpoints(Callback):
    """``best.ckpt`` on ``val/acc1`` improvements, ``last.ckpt`` after every epoch and every ``every_n_steps`` steps,
    and ``last.ckpt`` at the step where SIGINT / SIGTERM asked training to stop.

    ``record`` (see :func:`run_record`) is stored in every checkpoint under ``"pand"`` for :func:`check_resume`.

    A stop signal is acted on after the optimizer step it arrived in (end of a batch; at the last batch of an epoch,
    after that epoch's validation and checkpoints, since a checkpoint inside the epoch's last step would make the
    resumed loop think the epoch is still open): ``last.ckpt`` is written there and
    :class:`~pand.errors.Interrupted` raised, naming it. Training installs its own handlers once Lightning has
    registered its own (just before the loop starts): Lightning's SIGTERM handling ends ``fit`` with a ``SystemExit``
    that reports success. With several processes, one process receiving the signal stops all of them at the same step.
    """

    def __init__(self, folder: str | os.PathLike, record: Mapping[str, Any], *, monitor: str = "val/acc1",
                 every_n_steps: int = 0) -> None:
        self.folder = Path(folder)
        self.record = dict(record)
        self.monitor = monitor
        self.every_n_steps = int(every_n_steps or 0)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._best_pending = False
        self.stop = DeferredStop()
        #: (epoch, global step) of the last ``last.ckpt`` this process wrote
        self.last_saved: tuple[int, int] | None = None

    @property
    def state_key(self) -> str:
        return "pand.RunCheckpoints"

    @property
    def best_path(self) -> Path | None:
        return self.folder / BEST if self.best_score is not None and (self.folder / BEST).is_file() else None

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")

    def on_train_start(self, trainer, pl_module) -> None:
        self.stop.install()

    def on_train_end(self, trainer, pl_module) -> None:
        # Here, not in teardown(): Lightning restores the handlers it replaced in its own teardown, which runs before
        # the callbacks' teardown hooks; ours must be gone by then.
        self.stop.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.stop.restore()

    def _stop_requested(self, trainer) -> bool:
        pending = self.stop.pending is not None
        if trainer.world_size > 1:
            pending = bool(trainer.strategy.reduce_boolean_decision(pending, all=False))
        return pending

    def _stop(self, trainer) -> None:
        signum = self.stop.pending if self.stop.pending is not None else int(signal.SIGTERM)  # another process's
        epoch, step = self.last_saved or (trainer.current_epoch, trainer.global_step)
        raise Interrupted(signum, f"{self.last_path} (epoch {epoch}, step {step}; {signal_name(signum)} arrived "
                          "during that step)", checkpoint=str(self.last_path))

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            # Temporary files of a save that was killed: never under a real name, so never read, only removed.
            for name in (BEST, LAST):
                for stale in leftover_temp_files(self.folder, name):
                    stale.unlink(missing_ok=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = {**self.record, "epoch": trainer.current_epoch, "global_step": trainer.global_step}

    def _save(self, trainer, name: str) -> None:
        if name != BEST:
            trainer.save_checkpoint(self.folder / name, weights_only=False)
            self.last_saved = (trainer.current_epoch, trainer.global_step)
            return
        # best.ckpt is for evaluating and deploying, never for resuming (last.ckpt resumes), so it keeps the weights
        # and the run's record but not the optimizer state (two extra copies of the weights with AdamW). Lightning's
        # own weights_only save is not used: it skips the callbacks' on_save_checkpoint, which is where the EMA
        # callback puts the averaged weights into the state dict and RunCheckpoints its record.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for key in _TRAINING_STATE:
            checkpoint.pop(key, None)
        trainer.strategy.save_checkpoint(checkpoint, self.folder / name)
        trainer.strategy.barrier("RunCheckpoints.save_best")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        score = float(value)
        if score != score:  # NaN never counts as an improvement
            return
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # Validation at the end of the epoch: write last.ckpt first (on_train_epoch_end, the same weights),
                # so that a kill between the two saves never leaves best.ckpt newer than last.ckpt.
                self._best_pending = True
            else:
                self._save(trainer, BEST)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the end-of-epoch save (and a stop) follow right after validation
        stop = self._stop_requested(trainer)
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self._save(trainer, LAST)
        if stop:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, LAST)
        if self._best_pending:
            self._best_pending = False
            self._save(trainer, BEST)
        if self._stop_requested(trainer):
            self._stop(trainer)


# -- what a checkpoint was trained on -----------------------------------------------------------------------------
def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_record(run_dir: str | os.PathLike, splits: Mapping[str, Any], context: Any | None) -> dict[str, Any]:
    """What a run trains on, beyond its config: data content, the teacher's identity, learned text features."""
    return {
        "version": RECORD_VERSION,
        "run_dir": str(run_dir),
        "classes": list(splits["train"].classes),
        "fingerprints": {name: ds.fingerprint() for name, ds in splits.items()},
        "teacher": dict(context.identity) if context is not None and context.identity else None,
        "text_features": tensor_digest(getattr(context, "prompt_embeds", None)),
    }


# Config keys that must agree for a resume to continue the same training. Operational settings (where the data lives,
# loader workers, devices, the number of epochs, where the views are made: the same views to ~1e-6) may change; what
# they point at is checked by the record instead.
_IGNORED_ON_RESUME = {
    "data": {"root", "download", "num_workers", "pin_memory", "decoded_cache", "augment_on", "eval_batch_size"},
    "teacher": {"pretrained", "cache_dir", "text_features", "weights", "ckpt"},
    "student": {"pretrained", "weights"},
    "method": set(),
    "optim": set(),
    "scheduler": set(),
    # where the fine-tune started and the export after it do not change the training a resume continues
    "quantize": {"init_from", "export", "calibration"},
}
# A section that older checkpoints do not have, and the value that meant.
_ABSENT = {"quantize": {"name": "none"}}
# Sections of which only some entries define the training: of the callbacks, the weight average (the rest log or
# stop early, which a resume may change).
_COMPARED_ON_RESUME = {"callbacks": {"ema"}}


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: obj}


def _compared_part(config: Mapping[str, Any], group: str) -> dict[str, Any]:
    section = config.get(group) or _ABSENT.get(group, {})
    if group in _COMPARED_ON_RESUME:
        return {k: v for k, v in section.items() if k in _COMPARED_ON_RESUME[group]}
    return {k: v for k, v in section.items() if k not in _IGNORED_ON_RESUME[group]}


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"<key>: checkpoint <a>, this run <b>"`` for every training-defining config key that differs."""
    diffs = []
    if stored.get("seed") != current.get("seed"):
        diffs.append(f"seed: checkpoint {stored.get('seed')!r}, this run {current.get('seed')!r}")
    for group in (*_IGNORED_ON_RESUME, *_COMPARED_ON_RESUME):
        a, b = _compared_part(stored, group), _compared_part(current, group)
        fa, fb = _flatten(a, group), _flatten(b, group)
        for key in sorted(set(fa) | set(fb)):
            if fa.get(key, "<unset>") != fb.get(key, "<unset>"):
                diffs.append(f"{key}: checkpoint {fa.get(key, '<unset>')!r}, this run {fb.get(key, '<unset>')!r}")
    return diffs


def record_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    diffs = []
    for split, fp in current["fingerprints"].items():
        old = (stored.get("fingerprints") or {}).get(split)
        if old != fp:
            diffs.append(f"data fingerprint of the {split} split: the images or labels differ from the ones the "
                         f"checkpoint was trained on ({(old or 'none')[:12]} vs {fp[:12]})")
    if stored.get("teacher") != current["teacher"]:
        diffs.append(f"teacher identity: checkpoint {stored.get('teacher')}, this run {current['teacher']}")
    if stored.get("text_features") != current["text_features"]:
        diffs.append("learned text features (teacher.text_features): the file's contents differ")
    return diffs


# -- resuming -----------------------------------------------------------------------------------------------------
def check_resume_config(ckpt_path: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, Any]:
    """Before anything is built: the checkpoint is readable, resumable, and trained with this config.

    Returns the checkpoint's bookkeeping (``epoch``, ``global_step``, its record).
    """
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, mmap=True)
    if not is_resumable(ckpt):
        raise CheckpointError(f"{ckpt_path} holds weights only, not the training state a resume needs")
    diffs = config_differences(stored_config(ckpt, ckpt_path), config)
    if diffs:
        raise MismatchError(f"cannot resume from {ckpt_path}: it was trained with other settings:\n  "
                            + "\n  ".join(diffs) + "\nStart a new run (another run_dir) for other settings.")
    allow_older = bool((config.get("checkpoint") or {}).get("allow_older"))
    info = {"epoch": int(ckpt.get("epoch", 0)), "global_step": int(ckpt.get("global_step", 0)),
            "record": ckpt.get(RECORD_KEY)}
    problems = _newer_elsewhere(ckpt_path, info)
    if problems and not allow_older:
        raise MismatchError(
            f"refusing to resume from {ckpt_path} (epoch {info['epoch']}, step {info['global_step']}): "
            + "; ".join(problems)
            + ". Resuming from it would drop that later work. Resume from the newest checkpoint, or pass "
            "checkpoint.allow_older=true to continue from this one anyway (the log after it is discarded)."
        )
    for problem in problems:
        log.warning("resuming from an older checkpoint as asked (checkpoint.allow_older=true): %s", problem)
    return info


def _newer_elsewhere(ckpt_path: Path, info: Mapping[str, Any]) -> list[str]:
    problems = []
    for other in sorted(ckpt_path.parent.glob("*.ckpt")):
        if other.resolve() == ckpt_path.resolve():
            continue
        try:
            ckpt = read_checkpoint(other, mmap=True)
        except CheckpointError as err:
            log.warning("ignoring %s", err)
            continue
        if is_resumable(ckpt) and int(ckpt.get("global_step", 0)) > info["global_step"]:
            problems.append(f"{other.name} in the same folder is newer (epoch {ckpt.get('epoch')}, step "
                            f"{ckpt.get('global_step')})")
    # A checkpoint is written after the validation of its epoch, so the log may be at most one epoch ahead of it;
    # more means the checkpoint is older than the run folder it sits in (copied or replaced).
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    logged = last_validated_epoch(run_dir / "metrics.csv")
    if logged is not None and logged > info["epoch"] + 1:
        problems.append(f"{run_dir / 'metrics.csv'} already records the validation of epoch {logged}, so this "
                        "checkpoint is older than the run it sits in (was the folder copied, or the file replaced?)")
    return problems


def last_validated_epoch(metrics_csv: Path) -> int | None:
    if not metrics_csv.is_file():
        return None
    try:
        with metrics_csv.open(newline="") as f:
            epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val/acc1") and r.get("epoch")]
    except (OSError, ValueError, csv.Error, KeyError):
        return None
    return max(epochs, default=None)


def check_resume_record(ckpt_path: str | os.PathLike, stored: Mapping[str, Any] | None,
                        current: Mapping[str, Any]) -> None:
    """After data and teacher are built: same data content, same teacher, same learned text features."""
    if not stored:
        log.warning("%s carries no record of its data and teacher (written by an older pand): only its settings "
                    "were checked", ckpt_path)
        return
    diffs = record_differences(stored, current)
    if diffs:
        raise MismatchError(f"cannot resume from {ckpt_path}: it was trained on something else:\n  "
                            + "\n  ".join(diffs) + "\nStart a new run (another run_dir) to train on this.")
    if stored.get("run_dir") and Path(stored["run_dir"]) != Path(current["run_dir"]):
        log.info("%s was written by the run in %s; continuing in %s", ckpt_path, stored["run_dir"], current["run_dir"])
