"""A frozen image classifier as the teacher: any timm or torchvision model with local weights, or a student that pand
itself trained (``teacher.ckpt=runs/<run>/checkpoints/best.ckpt`` after ``pand train method=ce ...``).

Its per-sample outputs are ``logits`` over the run's classes and the ``stage_features`` of its stages (``teacher.stages``,
default: found from the model); the class count is checked with a forward pass at the real
input size, so a teacher trained on other classes is refused before training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pand.errors import ConfigError, WeightsUnavailableError
from pand.io import file_digest
from pand.networks.cifar import create_cifar_model, is_cifar_model
from pand.networks.weights import load_weights_file
from pand.students.checkpoint import load_checkpoint_student
from pand.teachers.clip import RANDOM_WEIGHTS, weights_digest
from pand.teachers.frozen import FrozenTeacher
from pand.teachers.outputs import LOGITS, STAGE_FEATURES
from pand.teachers.registry import TeacherKind, register_teacher_kind


class ClassifierTeacher(FrozenTeacher):
    """A frozen classifier ``model: images -> logits``."""

    provides = frozenset({LOGITS, STAGE_FEATURES})

    def __init__(self, model: nn.Module, *, num_classes: int, image_size: int | None, mean: Sequence[float],
                 std: Sequence[float], identity: Mapping[str, str]) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.image_size = None if image_size is None else int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.identity = dict(identity)
        self.freeze()

    @property
    def stage_root(self) -> nn.Module:
        return self.model

    def outputs(self, images: torch.Tensor, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        if not keys & self.provides:
            return {}
        with self.capturing_stages(STAGE_FEATURES in keys) as stages:
            logits = self.model(images).float()
            out = {STAGE_FEATURES: stages()} if STAGE_FEATURES in keys else {}
        if LOGITS in keys:
            out[LOGITS] = logits
        return out


def _random_seed(pretrained: str) -> int:
    if ":" not in pretrained:
        return 0
    try:
        return int(pretrained.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"teacher.pretrained={pretrained!r}: use 'random' or 'random:<integer seed>'") from None


def create_classifier(name: str, source: str, num_classes: int) -> nn.Module:
    """An untrained classifier ``name`` with ``num_classes`` outputs, from torchvision, pand's CIFAR networks or timm
    (``source`` auto: the first of those that knows the name)."""
    import timm
    import torchvision

    in_tv = name in torchvision.models.list_models(module=torchvision.models)
    in_timm = timm.is_model(name)
    if source == "cifar" or (source == "auto" and not in_tv and is_cifar_model(name)):
        return create_cifar_model(name, num_classes)
    if source == "torchvision" or (source == "auto" and in_tv):
        if not in_tv:
            raise ConfigError(f"{name!r} is not a torchvision classification model")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if source == "timm" or (source == "auto" and in_timm):
        if not in_timm:
            raise ConfigError(f"{name!r} is not a timm model name")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if source not in ("auto", "timm", "torchvision", "cifar"):
        raise ConfigError(f"teacher.source must be auto, timm, torchvision or cifar, got {source!r}")
    raise ConfigError(f"teacher.model={name!r} is neither a torchvision nor a timm model")


def weight_source_error(teacher: Mapping[str, Any]) -> str | None:
    """Why the weights of a classifier teacher are not given exactly once, or None when they are."""
    given = [k for k in ("ckpt", "weights", "pretrained") if teacher.get(k)]
    if len(given) == 1:
        return None
    return ("a classifier teacher needs exactly one of teacher.ckpt=runs/<run>/checkpoints/best.ckpt (a model pand "
            "trained), teacher.weights=/path/to/state_dict.pth (with teacher.model=<timm or torchvision name>) or "
            f"teacher.pretrained=random (tests only); got {given or 'none'}")


def load_classifier_teacher(
    teacher: Mapping[str, Any], *, classes: Sequence[str], data: Mapping[str, Any], device: str | torch.device = "cpu"
) -> ClassifierTeacher:
    """The classifier teacher of a ``teacher=classifier`` config, checked against the run's classes.

    One of ``teacher.ckpt`` (a pand checkpoint), ``teacher.weights`` (a state dict of ``teacher.model`` with the run's
    classes, ``.pth``/``.safetensors``) or ``teacher.pretrained=random[:seed]`` (tests only) says where the weights
    come from. ``teacher.image_size``/``mean``/``std`` give the input the weights expect (default: the data's).
    """
    num_classes = len(classes)
    ckpt, weights, pretrained = teacher.get("ckpt"), teacher.get("weights"), teacher.get("pretrained")
    error = weight_source_error(teacher)
    if error:
        raise ConfigError(error)
    size = teacher.get("image_size") or data.get("image_size")
    mean, std = teacher.get("mean") or data["mean"], teacher.get("std") or data["std"]
    if ckpt:
        model, stored, record = load_checkpoint_student(ckpt)
        stored_data = stored["data"]
        size, mean, std = stored_data["image_size"], stored_data["mean"], stored_data["std"]
        trained_classes = record.get("classes")
        identity = {"kind": "classifier", "model": stored["student"]["name"], "source": f"pand-checkpoint:{ckpt}"}
        if trained_classes is not None and list(trained_classes) != list(classes):
            raise ConfigError(f"the teacher checkpoint {ckpt} was trained on other classes than this run's")
    else:
        name, source = teacher["model"], teacher.get("source", "auto")
        if pretrained:
            if not str(pretrained).startswith(RANDOM_WEIGHTS):
                raise ConfigError(f"teacher.pretrained={pretrained!r}: a classifier teacher takes 'random' or "
                                  "'random:<seed>' here (tests only); real weights come from teacher.weights or ckpt")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_random_seed(str(pretrained)))
                model = create_classifier(name, source, num_classes)
            origin = str(pretrained)
        else:
            model = create_classifier(name, source, num_classes)
            try:
                missing, unexpected = model.load_state_dict(load_weights_file(weights), strict=False)
            except RuntimeError as err:  # shape mismatches, e.g. a head for another number of classes
                detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
                raise WeightsUnavailableError(
                    f"teacher.weights={weights} does not fit {name} with {num_classes} classes: {detail}"
                ) from None
            if missing or unexpected:
                raise WeightsUnavailableError(
                    f"teacher.weights={weights} does not fit {name} with {num_classes} classes: missing keys "
                    f"{missing[:5]}, unexpected keys {unexpected[:5]}"
                )
            origin = f"file:{Path(weights).resolve()}"
        identity = {"kind": "classifier", "model": name, "source": origin}
    identity["weights"] = weights_digest(model)
    result = ClassifierTeacher(model, num_classes=num_classes, image_size=size, mean=mean, std=std, identity=identity)
    result.to(device)
    result.use_stages(teacher.get("stages"))
    _check_outputs(result, num_classes, int(size or 32))
    return result


def _check_outputs(teacher: ClassifierTeacher, num_classes: int, size: int) -> None:
    with torch.no_grad():
        out = teacher.model(torch.zeros(1, 3, size, size, device=teacher.device))
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ConfigError(
            f"the classifier teacher gives outputs of shape {tuple(out.shape)} at {size} px; this run has "
            f"{num_classes} classes, so it needs logits of shape [B, {num_classes}]"
        )


@register_teacher_kind("classifier")
class ClassifierKind(TeacherKind):
    """A frozen image classifier over the run's classes: logits and stage features; its cache stores logits."""

    provides = frozenset({LOGITS, STAGE_FEATURES})
    cached = frozenset({LOGITS})
    served_from_cache = frozenset({LOGITS})

    def load(self, teacher: Mapping[str, Any], *, data: Mapping[str, Any], classes: Sequence[str] | None,
             device: str | torch.device) -> ClassifierTeacher:
        if classes is None:
            raise ConfigError("a classifier teacher is loaded for a run's classes; none were given")
        return load_classifier_teacher(teacher, classes=classes, data=data, device=device)

    def spec(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        """The weights file (``teacher.weights`` or ``teacher.ckpt``) is named by its resolved path and the digest
        of its content: ``best.ckpt`` is rewritten in place while its run trains on, and a cache of the old weights
        must then be refused although the path is the same. Hashing reads the file once (~0.6 GB/s)."""
        ckpt, weights = teacher.get("ckpt"), teacher.get("weights")
        path = Path(ckpt or weights).expanduser().resolve() if (ckpt or weights) else None
        # A pand checkpoint brings its own network, input size and normalisation; the config's are then ignored.
        own = {} if ckpt else {"model": teacher.get("model"), "source": teacher.get("source", "auto"),
                               "image_size": teacher.get("image_size"), "mean": teacher.get("mean"),
                               "std": teacher.get("std")}
        return {"kind": self.name, **own, "ckpt": str(path) if ckpt else None,
                "weights": str(path) if weights else None, "pretrained": teacher.get("pretrained"),
                "file_digest": file_digest(path) if path is not None and path.is_file() else None}

    def setting_errors(self, teacher: Mapping[str, Any]) -> list[str]:
        error = weight_source_error(teacher)
        return [error] if error else []

    def context(self, teacher: FrozenTeacher) -> dict[str, Any]:
        return {**super().context(teacher), "num_classes": teacher.num_classes}

    def context_from_cache(self, meta: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().context_from_cache(meta, teacher), "num_classes": len(meta["classes"])}
