"""Reading pand checkpoint files: only as weights (``torch.load(weights_only=True)``, never unpickling code), with
one clear :class:`~pand.errors.CheckpointError` for a file that is missing, empty, truncated, of another kind or that
carries code. Teachers (a pand checkpoint as a classifier teacher), students (rebuilt for use) and the engine (resume)
all read checkpoints through here.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pand.errors import CheckpointError

#: Where a pand checkpoint keeps the record of what it was trained on (see :func:`pand.engine.checkpoints.run_record`).
RECORD_KEY = "pand"


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``; :class:`CheckpointError` if it is not readable.

    ``mmap=True`` maps tensors instead of reading them, for looking at a checkpoint's bookkeeping cheaply.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    prefix = f"{path} is not a readable pand checkpoint"
    if path.stat().st_size == 0:
        raise CheckpointError(f"{prefix}: the file is empty (a save that was interrupted, or a copy that failed)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{prefix}: it is not a PyTorch checkpoint archive (truncated by an interrupted copy or save, or another "
            "kind of file)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. executing whatever the file carries: never relay it.
        raise CheckpointError(
            f"{prefix}: it holds Python objects other than tensors and plain containers, and pand never loads "
            "files that could execute code"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{prefix}: it is damaged or truncated ({first_line})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{prefix}: it has no 'state_dict' (not a checkpoint written by pand or Lightning)")
    return ckpt


def stored_config(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The resolved training config a pand checkpoint was trained with."""
    try:
        return ckpt["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} is not a pand training checkpoint (no stored config)") from None


STUDENT_PREFIX = "distiller.student."


def student_state(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The student's weights of a pand checkpoint, under the student's own keys."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STUDENT_PREFIX)}


def is_resumable(ckpt: Mapping[str, Any]) -> bool:
    """Whether a checkpoint holds the training state (loops, optimizers), not only weights."""
    return "loops" in ckpt and "optimizer_states" in ckpt
