"""A student rebuilt from a pand checkpoint, for evaluation, prediction, export or as a classifier teacher."""

from __future__ import annotations

import os
from typing import Any

import torch

from pand.checkpoint_files import RECORD_KEY, STUDENT_PREFIX, read_checkpoint, stored_config, student_state
from pand.errors import CheckpointError, MismatchError
from pand.students.factory import build_student
from pand.students.open_vocab import OpenVocabStudent


def load_checkpoint_student(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The student of a pand checkpoint (weights loaded, eval mode), its training config and its run record.

    Nothing is downloaded: the student is rebuilt from its stored config without pretrained weights.
    """
    ckpt = read_checkpoint(path)
    config = stored_config(ckpt, path)
    state = student_state(ckpt)
    # A closed-set student has a linear classifier; an open-vocabulary one a vocabulary (class text matrix).
    head = state.get("linear_cls.weight", state.get("vocabulary"))
    if head is None:
        raise CheckpointError(f"{path} holds no student classifier ('{STUDENT_PREFIX}linear_cls.weight' or "
                              f"'{STUDENT_PREFIX}vocabulary')")
    s = config["student"]
    size = int(config["data"]["image_size"])
    student = build_student(s["name"], int(head.shape[0]), source=s.get("source", "auto"), pretrained=False,
                            image_size=size, kwargs=s.get("kwargs"))
    try:
        if "vocabulary" in state:
            student = OpenVocabStudent.from_state(student, state, dict(config.get("method") or {}), (3, size, size))
        else:
            student.load_state_dict(state)
    except RuntimeError as err:
        raise MismatchError(f"the student weights of {path} do not fit its stored student config: "
                            f"{str(err).splitlines()[0]}") from None
    return student.eval(), config, dict(ckpt.get(RECORD_KEY) or {})
