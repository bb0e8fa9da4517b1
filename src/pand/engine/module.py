"""The Lightning module that trains any distiller.

Nothing here knows a method: each step asks the teacher source for the outputs the distiller declared
(``distiller.requires``) and sums the loss terms the distiller returns. Validation and test measure the student alone,
so the teacher never runs outside training steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pand.data.mixing import BatchMixer
from pand.distillers import Distiller, Progress
from pand.engine.builders import build_optimizer, build_scheduler, step_timm_scheduler
from pand.errors import ConfigError, TrainingDivergedError
from pand.teachers.frozen import TeacherRef


class DistillationModule(L.LightningModule):
    """Trains ``distiller`` (student + heads) with teacher outputs from ``teacher_source``.

    The teacher source is deliberately not a registered submodule: checkpoints then hold the student and its trainable
    heads only, and DDP never wraps or synchronises the frozen teacher.
    """

    def __init__(
        self,
        distiller: Distiller,
        teacher_source: torch.nn.Module | None = None,
        *,
        optim: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        mixer: BatchMixer | None = None,
    ) -> None:
        super().__init__()
        self.distiller = distiller
        self.mixer = mixer
        self._teacher_holder = TeacherRef(teacher_source)
        self.optim_cfg = dict(optim or {})  # empty for evaluation, which never builds an optimizer
        self.scheduler_cfg = dict(scheduler or {})
        self.seed = int((config or {}).get("seed", 0))
        if config is not None:
            self.save_hyperparameters({"config": dict(config)})
        if distiller.requires and teacher_source is None:
            raise ConfigError(f"method {distiller.name!r} needs teacher outputs {sorted(distiller.requires)}")
        c = distiller.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=c, average="micro")
        for split in ("val", "test"):
            setattr(self, f"{split}_acc1", MulticlassAccuracy(num_classes=c, average="micro"))
            setattr(self, f"{split}_acc5", MulticlassAccuracy(num_classes=c, top_k=min(5, c), average="micro"))

    @property
    def teacher_source(self) -> torch.nn.Module | None:
        return self._teacher_holder.value

    def _move_teacher(self) -> None:
        if self.teacher_source is not None:
            self.teacher_source.to(self.device)

    def on_fit_start(self) -> None:
        self._move_teacher()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distiller(images)

    def _seed_step(self) -> None:
        # Dropout, drop-path and every other random op of a step draw from the global generators. Seeded from the
        # run's seed, the step and the rank, a step's randomness no longer depends on what consumed the generators
        # before it (the data loader draws from them when it starts an epoch, differently with and without worker
        # processes; a resumed run starts fresh), so a run is reproducible across loader settings and a resume replays
        # exactly what an uninterrupted run would have done.
        torch.manual_seed((self.seed * 1_000_003 + self.global_step * 1_009 + self.global_rank) % (2**63 - 1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._seed_step()
        if self.mixer is not None:
            # Seeded by the global step, so a resumed run mixes exactly as an uninterrupted one.
            batch = self.mixer(batch, self.global_step)
        requires = self.distiller.requires
        teacher = self.teacher_source(batch, requires) if requires else {}
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        out = self.distiller.training_losses(batch, teacher, Progress(self.current_epoch, max_epochs))
        loss = torch.stack([v.float() for v in out.losses.values()]).sum()
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"non-finite training loss at epoch {self.current_epoch} step {batch_idx}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in out.losses.items())
                + ". Training stopped; lower optim.lr (or check the inputs) and resume from the last checkpoint"
            )
        batch_size = batch["label"].shape[0]
        labelled = self.distiller.labelled(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if bool(labelled.any()):  # on the labelled samples; a label-free run has no training accuracy
            self.train_acc(out.logits.detach()[labelled], batch["label"][labelled])
            self.log("train/acc1", self.train_acc, on_step=False, on_epoch=True, batch_size=int(labelled.sum()))
        for name, value in out.losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        for name, value in out.logs.items():
            self.log(f"train/{name}", float(value), batch_size=batch_size)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        logits = self.distiller(batch["image"]).float()
        labels = batch["label"]
        acc1, acc5 = getattr(self, f"{split}_acc1"), getattr(self, f"{split}_acc5")
        acc1(logits, labels)
        acc5(logits, labels)
        n = labels.shape[0]
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), batch_size=n, sync_dist=True)
        self.log(f"{split}/acc1", acc1, prog_bar=True, batch_size=n)
        self.log(f"{split}/acc5", acc5, batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.optim_cfg, params)
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        interval = self.scheduler_cfg.get("interval", "epoch")
        total_steps = int(self.trainer.estimated_stepping_batches) if interval == "step" else max_epochs
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, max_epochs=max_epochs, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # Lightning steps torch's schedulers itself; timm's take the epoch (or update count) they are at.
        interval = self.scheduler_cfg.get("interval", "epoch")
        if not step_timm_scheduler(scheduler, interval, self.current_epoch + 1, self.global_step):
            super().lr_scheduler_step(scheduler, metric)
