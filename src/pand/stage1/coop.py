"""CoOp training of a :class:`PromptLearner` on pre-computed teacher image features (PAND stage 1, PSC).

Only the context vectors are trained; the image tower never runs. Loss ``CE(logit_scale * norm(f_img) @ T_ctx^T, y)``,
SGD with momentum and weight decay, CoOp's constant warm-up (``warmup_epochs`` epochs at ``warmup_lr``) followed by a
cosine schedule over ``epochs`` (the learning rate of epoch ``e >= warmup_epochs`` is
``0.5 * lr * (1 + cos(pi * e / epochs))``, i.e. the warm-up replaces the first epochs of the cosine curve, as in
Dassl's ``ConstantWarmupScheduler``). The text features of the epoch with the best validation accuracy are kept
(first such epoch on ties), and the learner's context is left at that epoch's value.

``precision="bf16"`` / ``"fp16"`` runs the CoOp forward (the text tower re-encoding all class prompts, and the logits)
under autocast: the frozen text tower dominates the cost of every step (fp16 also scales the loss, as fp16's range
would flush the context's small gradients to zero). The pass is checked first: the untrained prompts are encoded in
fp32 and in the low precision and training is refused (:class:`~pand.errors.PrecisionError`) unless they agree within
``tolerance`` (see :mod:`pand.teachers.precision`). The text features returned are always re-encoded in fp32 from the
best context, and the agreement of the low-precision encoding of that same context is reported
(``CoopResult.text_features_agreement``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pand.errors import ConfigError
from pand.stage1.learner import PromptLearner
from pand.teachers.precision import (
    DEFAULT_TOLERANCE,
    AgreementProbe,
    measure_agreement,
    teacher_autocast,
)

log = logging.getLogger(__name__)

__all__ = ["CoopResult", "coop_lr", "train_coop"]


@dataclass
class CoopResult:
    """What :func:`train_coop` produced.

    ``text_features``: ``[C, D]`` normalised class text features of the best epoch (float32, on the CPU).
    ``val_acc``: best validation top-1 (fraction). ``best_epoch``: its 0-based epoch.
    ``history``: one dict per epoch: ``epoch, train_loss, train_acc, val_acc, lr``.
    ``initial_val_acc``: validation top-1 of the untrained prompts (zero-shot with ``ctx_init``), for reference.
    ``precision``: of the training forward. Unless fp32: ``text_features`` are the fp32 encoding of the best context,
    ``val_acc`` their validation top-1 (the selection used the low-precision accuracies of ``history``),
    ``text_features_agreement`` the :func:`~pand.teachers.precision.measure_agreement` stats of the low-precision
    encoding of that context against them, and ``probe_agreement`` those of the untrained prompts (checked).
    """

    text_features: torch.Tensor
    val_acc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    initial_val_acc: float = float("nan")
    precision: str = "fp32"
    text_features_agreement: dict | None = None
    probe_agreement: dict | None = None


def coop_lr(epoch: int, *, epochs: int, lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    """Learning rate of a 0-based epoch: constant warm-up, then cosine over all ``epochs``."""
    if epoch < warmup_epochs:
        return float(warmup_lr)
    return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def _check_split(name: str, feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    feats = torch.as_tensor(feats)
    labels = torch.as_tensor(labels)
    if feats.dim() != 2:
        raise ConfigError(f"{name}_features must be [N, D], got shape {tuple(feats.shape)}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ConfigError(
            f"{name}_labels must be [N] with N = {feats.shape[0]} (the number of {name} features), "
            f"got shape {tuple(labels.shape)}"
        )
    if feats.shape[0] == 0:
        raise ConfigError(f"the {name} split is empty")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"{name}_labels must be integer class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ConfigError(f"{name}_labels lie in [{lo}, {hi}] but the prompt learner has {num_classes} classes")
    return feats, labels.long()


@torch.no_grad()
def _accuracy(feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, chunk: int = 65536) -> float:
    correct = 0
    for i in range(0, feats.shape[0], chunk):
        pred = (feats[i : i + chunk] @ text.t()).argmax(dim=1)
        correct += int((pred == labels[i : i + chunk]).sum())
    return correct / feats.shape[0]


def train_coop(
    learner: PromptLearner,
    train_features,
    train_labels,
    val_features,
    val_labels,
    *,
    logit_scale: float,
    epochs: int = 200,
    batch_size: int = 32,
    lr: float = 0.002,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    precision: str = "fp32",
    tolerance: float = DEFAULT_TOLERANCE,
) -> CoopResult:
    """Train the learner's context vectors with CoOp on cached, L2-normalised teacher image features.

    Features are re-normalised here (a no-op for normalised input). Model selection uses the validation split only.
    The learner (and the clip model it references) is moved to ``device``; on return its context holds the best
    epoch's value. ``precision`` (fp32, bf16, fp16): of the CoOp forward, checked against fp32 within ``tolerance``
    before training (see the module docstring).
    """
    if not isinstance(learner, PromptLearner):
        raise ConfigError(f"train_coop needs a PromptLearner, got {type(learner).__name__}")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ConfigError(f"logit_scale must be a positive number, got {logit_scale!r}")
    c = learner.num_classes
    tr_x, tr_y = _check_split("train", train_features, train_labels, c)
    va_x, va_y = _check_split("val", val_features, val_labels, c)
    if tr_x.shape[1] != va_x.shape[1]:
        raise ConfigError(f"train features have D = {tr_x.shape[1]} but val features have D = {va_x.shape[1]}")

    probe = AgreementProbe(precision, tolerance, what="CoOp text features of the untrained prompts",
                           setting="prompts")
    device = torch.device(device)
    learner.to(device)
    tr_x = F.normalize(tr_x.to(device=device, dtype=torch.float32), dim=-1)
    va_x = F.normalize(va_x.to(device=device, dtype=torch.float32), dim=-1)
    tr_y, va_y = tr_y.to(device), va_y.to(device)

    def encode(precision_name: str) -> torch.Tensor:
        with teacher_autocast(device, precision_name):
            return learner()

    learner.eval()
    with torch.no_grad():
        text = probe(encode)  # refused here, before any step, if the low precision does not agree
    if text.shape[1] != tr_x.shape[1]:
        raise ConfigError(
            f"image features have D = {tr_x.shape[1]} but the teacher's text features have D = {text.shape[1]}; "
            "were the features extracted with another teacher?"
        )
    initial_val_acc = _accuracy(va_x, va_y, text)

    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    n = tr_x.shape[0]
    scale = float(logit_scale)

    # fp16's 5-bit exponent flushes the context's small gradients to zero: scale the loss (bf16 has fp32's range)
    scaler = torch.amp.GradScaler(device.type) if probe.precision == "fp16" else None

    best_acc, best_epoch = -1.0, -1
    best_features = text.detach().float().cpu()
    best_ctx = learner.ctx.detach().clone()
    history: list[dict] = []

    bar = _Progress(epochs, progress)
    try:
        for epoch in range(epochs):
            cur_lr = coop_lr(epoch, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr)
            for group in optimizer.param_groups:
                group["lr"] = cur_lr
            learner.train()
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum, correct = 0.0, 0
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                x, y = tr_x[idx], tr_y[idx]
                with teacher_autocast(device, probe.precision):
                    text = learner()  # CoOp: all C prompts are re-encoded every step
                    logits = scale * x @ text.t()
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                loss_sum += float(loss.detach()) * y.shape[0]
                correct += int((logits.detach().argmax(dim=1) == y).sum())
            learner.eval()
            with torch.no_grad(), teacher_autocast(device, probe.precision):
                text = learner()
            val_acc = _accuracy(va_x, va_y, text.float())
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / n,
                "train_acc": correct / n,
                "val_acc": val_acc,
                "lr": cur_lr,
            }
            history.append(record)
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_features = text.detach().float().cpu().clone()
                best_ctx = learner.ctx.detach().clone()
            bar.update(record, best_acc)
    finally:
        bar.close()

    with torch.no_grad():
        learner.ctx.copy_(best_ctx)
    agreement = None
    if probe.low:
        # What is stored must not carry the low precision's ~1 % error: encode the chosen context again in fp32.
        with torch.no_grad():
            best_features = learner().float()
            agreement = {"precision": probe.precision, "tolerance": probe.tolerance,
                         **measure_agreement(best_features, encode(probe.precision))}
            best_features = best_features.cpu()
        best_acc = _accuracy(va_x, va_y, best_features.to(device))
        if not agreement["max_rel_error"] <= probe.tolerance or agreement["nonfinite"]:
            log.warning("the %s encoding of the learned prompts is %.3g from fp32 (tolerance %g); the stored text "
                        "features are fp32, but training saw the %s ones", probe.precision,
                        agreement["max_rel_error"], probe.tolerance, probe.precision)
    return CoopResult(
        text_features=best_features,
        val_acc=float(best_acc),
        best_epoch=int(best_epoch),
        history=history,
        initial_val_acc=float(initial_val_acc),
        precision=probe.precision,
        text_features_agreement=agreement,
        probe_agreement=probe.stats,
    )


class _Progress:
    """A tqdm bar over epochs showing loss and accuracies; does nothing when disabled or tqdm is missing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc="CoOp", unit="epoch", leave=True)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._bar = None

    def update(self, record: dict, best: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                train_acc=f"{record['train_acc']:.3f}",
                val_acc=f"{record['val_acc']:.3f}",
                best=f"{best:.3f}",
                lr=f"{record['lr']:.2e}",
            )
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
