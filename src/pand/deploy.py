"""A distilled student outside training: :func:`load_student` is the one way every command gets it back.

``pand eval``, ``pand tsne``, ``pand predict`` and ``pand export`` all rebuild the student through here, from the
config stored in the checkpoint, without a teacher (except to turn new class names into an open-vocabulary
student's classifier) and without downloading anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pand.data.transforms import eval_transform
from pand.engine.open_vocab_eval import vocabulary_for
from pand.errors import ConfigError
from pand.students.checkpoint import load_checkpoint_student
from pand.students.exported import is_exported_path, load_exported
from pand.students.loaded import LoadedStudent
from pand.teachers.registry import load_teacher


def preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing of a run: resize the shorter side, centre crop, scale to [0, 1], normalise."""
    data = config["data"]
    return {"resize_size": int(data["resize_size"]), "image_size": int(data["image_size"]),
            "mean": [float(m) for m in data["mean"]], "std": [float(s) for s in data["std"]],
            "interpolation": "bilinear", "antialias": True, "crop": "center", "channels": "RGB"}


def load_student(path: str | os.PathLike, class_names: Sequence[str] | None = None, *,
                 device: str | torch.device = "cpu", teacher=None) -> LoadedStudent:
    """The student of a pand checkpoint, ready to predict.

    ``class_names`` replaces an open-vocabulary student's classes with any list: their text matrix is computed once
    with the teacher's text tower (prompt-template ensemble of the run) and kept in the model. A closed-set student
    classifies only the classes it was trained on, so it refuses other names. ``teacher`` skips loading the
    teacher again (a loaded CLIP teacher).

    ``path`` may also be what ``pand export`` wrote: a ``.onnx`` or ``.pt2`` file (or its folder), read with the
    ``student.json`` beside it (:func:`pand.students.exported.load_exported`). It runs on the CPU whatever
    ``device`` says, and its classes are fixed: other class names are refused.
    """

    if is_exported_path(path):
        return _load_exported(path, class_names)
    path = Path(path)
    model, config, record = load_checkpoint_student(path)
    names = list(record.get("classes") or [])
    if len(names) != model.num_classes:
        names = [f"class {i}" for i in range(model.num_classes)]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if not class_names:
            raise ConfigError("class_names is empty: give at least one class name")
        if hasattr(model, "set_vocabulary"):
            teacher = teacher if teacher is not None else load_teacher(config, device="cpu")
            model.set_vocabulary(*vocabulary_for(teacher, class_names, config["data"]["templates"], model))
            names = class_names
        elif class_names != names:
            raise ConfigError(f"{path} is a closed-set student of {len(names)} classes ({', '.join(names[:5])}"
                              f"{', ...' if len(names) > 5 else ''}); it cannot classify other names. Only an "
                              "open-vocabulary student (method=openvocab) takes class names at run time")
    pp = preprocessing(config)
    transform = eval_transform(pp["image_size"], pp["resize_size"], tuple(pp["mean"]), tuple(pp["std"]))
    return LoadedStudent(model.to(device).eval(), transform, names, config)


def _load_exported(path: str | os.PathLike, class_names: Sequence[str] | None) -> LoadedStudent:
    exported = load_exported(path)
    names = exported.class_names
    if class_names is not None and [str(c) for c in class_names] != names:
        # an exported graph holds its classifier (an open-vocabulary student's text matrix too) as constants
        raise ConfigError(f"{exported.path} classifies its {len(names)} exported classes ({', '.join(names[:5])}"
                          f"{', ...' if len(names) > 5 else ''}); the vocabulary is fixed in an exported model. "
                          "Predict with the checkpoint, or export it again with class_names=...")
    return LoadedStudent(exported.model, exported.preprocess, names, exported.config)
