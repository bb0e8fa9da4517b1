"""A student ready to predict, whatever it was loaded from (a checkpoint, an exported file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class LoadedStudent(tuple):
    """``(model, preprocess, class_names)``: the model (eval mode), its preprocessing (PIL image -> normalised
    tensor, as in evaluation) and the class names its logits refer to, in order. ``.config`` is the training config
    stored in the checkpoint."""

    def __new__(cls, model: nn.Module, preprocess: Callable[[Any], torch.Tensor], class_names: list[str],
                config: dict[str, Any]) -> LoadedStudent:
        loaded = super().__new__(cls, (model, preprocess, class_names))
        loaded.config = config
        return loaded

    @property
    def model(self) -> nn.Module:
        return self[0]

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self[1]

    @property
    def class_names(self) -> list[str]:
        return self[2]
