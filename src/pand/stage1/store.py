"""The file stage 1 writes and stage 2 reads: learned class text features with their provenance.

The record also holds a digest of the tensor (:func:`pand.cache.integrity.tensor_digests`): a file whose bytes were
altered in place still loads, so :func:`load_text_features` compares the digest and refuses such a file by name. A
file written before digests were recorded has none and is accepted as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pand.cache.integrity import TENSOR_DIGESTS, check_tensor_digests, tensor_digests
from pand.errors import ConfigError
from pand.provenance import check_provenance, load_tensors, save_tensors

_HINT = "learn the prompts again with `pand prompts ...`"


def save_text_features(path: str | Path, text_features: torch.Tensor, record: Mapping[str, Any]) -> Path:
    """``record`` must hold at least ``teacher`` (identity) and ``classes``."""
    missing = {"teacher", "classes"} - set(record)
    if missing:
        raise ValueError(f"text feature record lacks {sorted(missing)}")
    tensors = {"text_features": text_features.float()}
    return save_tensors(path, tensors,
                        {"kind": "learned_text_features", **record, TENSOR_DIGESTS: tensor_digests(tensors)})


def load_text_features(path: str | Path, teacher_identity: Mapping[str, str], classes: Sequence[str]) -> torch.Tensor:
    """The C x D learned features, if they were made with this teacher for these classes (in this order)."""
    if not Path(path).is_file():
        raise ConfigError(f"teacher.text_features={path} does not exist; make it with `pand prompts ...` (stage 1)")
    tensors, record = load_tensors(path)
    expected = {"kind": "learned_text_features", "teacher": dict(teacher_identity), "classes": list(classes)}
    check_provenance(path, record, expected, keys=["kind", "teacher", "classes"],
                     hint="Learn prompts for this teacher and dataset with `pand prompts ...`.")
    check_tensor_digests(path, tensors, record, hint=_HINT)
    return tensors["text_features"].float()


def read_record(path: str | Path) -> dict[str, Any]:
    return load_tensors(path)[1]
