"""pand's own Lightning callbacks: the exponential moving average of the weights (``callbacks=ema``), the one-line
parameter summary that replaces Lightning's model table, and the schedule of quantization-aware training."""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback, WeightAveraging

from pand.errors import ConfigError
from pand.students.quantize import quantization_state

log = logging.getLogger("pand")


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging with an exponential moving average of the given ``decay``.

    Validation, ``best.ckpt`` and the final model use the average (buffers such as BatchNorm statistics included);
    ``last.ckpt`` also keeps the raw weights, so a resumed run continues exactly.
    """

    def __init__(self, decay: float = 0.9998, use_buffers: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay!r} is not allowed: expected a number > 0 and < 1")
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        super().__init__(use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(float(decay)))
        self.decay = float(decay)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


class ParameterSummary(Callback):
    """One log line at the start of training: the student's parameters and those of the method's trainable heads.

    Lightning's table lists every child module of the training module, the accuracy metrics included, which says
    little about the model; ``callbacks=rich_summary`` brings it back when wanted.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        distiller = pl_module.distiller
        student = list(distiller.student.parameters())
        trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
        heads = trainable - sum(p.numel() for p in student if p.requires_grad)
        name = getattr(distiller.student, "name", type(distiller.student).__name__)
        log.info("student %s: %s parameters; method %s: %s trainable in its heads; %s trainable in all", name,
                 _millions(sum(p.numel() for p in student)), distiller.name, _millions(heads), _millions(trainable))


class QuantizationSchedule(Callback):
    """``quantize=qat``: each epoch's switches, from the epoch alone (so a resumed run sets them as the uninterrupted
    one did): training steps run quantized from ``start_epoch`` on, BatchNorm is frozen for the last
    ``freeze_bn_epochs`` epochs."""

    def __init__(self, start_epoch: int, freeze_bn_epochs: int) -> None:
        self.start_epoch, self.freeze_bn_epochs = int(start_epoch), int(freeze_bn_epochs)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        state = quantization_state(pl_module)
        if state is None:
            raise ConfigError("quantize=qat, but the student holds no fake-quantized layer")
        epoch, epochs = trainer.current_epoch, trainer.max_epochs
        quantized = epoch >= self.start_epoch
        frozen = self.freeze_bn_epochs > 0 and epochs is not None and epoch >= epochs - self.freeze_bn_epochs
        if (quantized, frozen) != (state.train_quantized, state.freeze_batch_norm) and trainer.is_global_zero:
            log.info("epoch %d: training steps %s, BatchNorm %s", epoch, "quantized" if quantized else "in float",
                     "frozen" if frozen else "training")
        state.train_quantized, state.freeze_batch_norm = quantized, frozen
