"""The file stage 1 writes and stage 2 reads: learned class text features with their provenance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pand.errors import ConfigError
from pand.provenance import check_provenance, load_tensors, save_tensors


def save_text_features(path: str | Path, text_features: torch.Tensor, record: Mapping[str, Any]) -> Path:
    """``record`` must hold at least ``teacher`` (identity) and ``classes``."""
    missing = {"teacher", "classes"} - set(record)
    if missing:
        raise ValueError(f"text feature record lacks {sorted(missing)}")
    return save_tensors(path, {"text_features": text_features.float()}, {"kind": "learned_text_features", **record})


def load_text_features(path: str | Path, teacher_identity: Mapping[str, str], classes: Sequence[str]) -> torch.Tensor:
    """The C x D learned features, if they were made with this teacher for these classes (in this order)."""
    if not Path(path).is_file():
        raise ConfigError(f"teacher.text_features={path} does not exist; make it with `pand prompts ...` (stage 1)")
    tensors, record = load_tensors(path)
    expected = {"kind": "learned_text_features", "teacher": dict(teacher_identity), "classes": list(classes)}
    check_provenance(path, record, expected, keys=["kind", "teacher", "classes"],
                     hint="Learn prompts for this teacher and dataset with `pand prompts ...`.")
    return tensors["text_features"].float()


def read_record(path: str | Path) -> dict[str, Any]:
    return load_tensors(path)[1]
