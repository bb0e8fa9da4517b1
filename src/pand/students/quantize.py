"""Quantization-aware training: the student computes as the int8 model ONNX Runtime will make of it.

``quantize=qat`` swaps every ``nn.Conv2d`` and ``nn.Linear`` of the student for a subclass that, in its forward,
rounds its weights and its input to the int8 grid of :mod:`pand.export_int8` and computes with the rounded values
(fake quantization); gradients pass the rounding unchanged (the straight-through estimator). The subclasses keep the
parameters and the state-dict keys of the modules they replace, so checkpoints, the teacher cache, stage taps and
every export read a QAT student as they read any other.

The grid is the one of the shipped model:

* weights: int8, one scale per output channel, symmetric, ``scale = max |w| / 127``. ONNX Runtime quantizes the
  weights after folding each BatchNorm into its convolution; folding multiplies whole output channels by a constant,
  and with one symmetric scale per output channel rounding commutes with that, so rounding the unfolded weights
  during training rounds the shipped ones too. BatchNorm therefore keeps training normally until it is frozen.
* activations (each quantized layer's input): uint8, one scale per tensor, over the range of the batch with 0 in it.
  The shipped model's ranges come from calibration images instead; the batch's own range keeps training free of
  state (an exact resume has nothing to restore) and follows the activations as they change.

:class:`QuantizationState` holds the two switches the schedule turns: whether training steps run quantized (before
``quantize.start_epoch`` they run in float; evaluation always runs quantized, so that every validation measures the
int8 model and selection compares like with like), and whether BatchNorm is frozen (for the last
``quantize.freeze_bn_epochs`` epochs it normalises with its running statistics and stops updating them, so the
network trains with the statistics it ships with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Weight and activation grids: int8 symmetric weights (-127..127), uint8 activations (0..255).
WEIGHT_LEVELS = (-127, 127)
ACTIVATION_LEVELS = (0, 255)
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class QuantizationState:
    """The switches shared by every fake-quantized layer and frozen BatchNorm of one student."""

    train_quantized: bool = True
    freeze_batch_norm: bool = False


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to int8 with one symmetric scale per output channel (dim 0)."""
    w = weight.detach()
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / WEIGHT_LEVELS[1]).float().clamp_min(_TINY)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, *WEIGHT_LEVELS)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to uint8 with one scale and zero point over the batch's range, 0 included."""
    d = x.detach().float()
    low, high = d.amin().clamp(max=0.0), d.amax().clamp(min=0.0)
    scale = ((high - low) / ACTIVATION_LEVELS[1]).clamp_min(_TINY).reshape(1)
    zero = torch.round(-low / scale).clamp(*ACTIVATION_LEVELS).to(torch.int32).reshape(1)
    # the rounding kernels take float32; under bf16 / fp16 autocast the activations come back in their own type
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, *ACTIVATION_LEVELS).to(x.dtype)


class _FakeQuantized:
    """The forward of a fake-quantized layer: its weights and its input on the int8 grid, unless the state says a
    training step runs in float."""

    state: QuantizationState
    weight: torch.Tensor
    training: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.state.train_quantized:
            return self._compute(x, self.weight)
        return self._compute(fake_quantize_activation(x), fake_quantize_weight(self.weight))


class QuantConv2d(_FakeQuantized, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights and input (same parameters and state-dict keys)."""

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(_FakeQuantized, nn.Linear):
    """``nn.Linear`` with fake-quantized weights and input (same parameters and state-dict keys)."""

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)


_SWAPS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


@dataclass
class QuantizedStudent:
    """What :func:`prepare_qat` did: the layers it fake-quantizes and the weighted layers it left in float."""

    state: QuantizationState
    quantized: list[str]
    float_layers: list[str]


def prepare_qat(model: nn.Module) -> QuantizedStudent:
    """Fake-quantize ``model`` in place: every plain ``nn.Conv2d`` / ``nn.Linear`` becomes a :class:`QuantConv2d` /
    :class:`QuantLinear` sharing its parameters, and every BatchNorm gets the hook that freezes it on demand.

    Weighted layers of other types (a timm ``Conv2dSame``, attention's fused projections) are left in float and listed
    by name. Call it before anything holds references to the student's submodules (the optimizer only holds its
    parameters, which stay the same objects)."""
    state = QuantizationState()
    quantized: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            swap = _SWAPS.get(type(child))
            if swap is None:
                continue
            replacement = swap.__new__(swap)
            replacement.__dict__ = child.__dict__.copy()  # the same parameters, buffers and hooks, the new forward
            replacement.state = state
            setattr(module, child_name, replacement)
            quantized.append(f"{name}.{child_name}" if name else child_name)
    float_layers = [name for name, m in model.named_modules()
                    if not isinstance(m, (QuantConv2d, QuantLinear, nn.modules.batchnorm._NormBase))
                    and any(p.dim() > 1 for p in m.parameters(recurse=False))]
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_BatchNormFreeze(state))
    return QuantizedStudent(state, quantized, float_layers)


class _BatchNormFreeze:
    """A forward pre-hook: while the state says so, the BatchNorm runs as in evaluation (running statistics, not
    updated) whatever mode its model is in. A hook, because Lightning puts the whole model back in train mode after
    every validation."""

    def __init__(self, state: QuantizationState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args) -> None:
        if self.state.freeze_batch_norm and module.training:
            module.training = False


def quantization_state(model: nn.Module) -> QuantizationState | None:
    """The switches of a student prepared by :func:`prepare_qat` (``None``: ``model`` is not fake-quantized)."""
    return next((m.state for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))), None)
