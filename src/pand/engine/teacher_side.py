"""The teacher side of a run, built in one place from the config: which teacher, live or cached, and the class-level
data (text embeddings, learned prompts) a method reads.

:func:`build_teacher_side` returns the :class:`~pand.distillers.TeacherContext` and the source of per-sample teacher
outputs that the method declared (``Distiller.requires``), from

* a live CLIP teacher (``teacher.kind=clip``): ``image_embeds``, and ``logits`` from them with the class text matrix
  (template embeddings, or learned CoOp features when ``teacher.text_features`` is set);
* the teacher cache of a CLIP teacher (``cache.dir``): the same outputs, read from disk, without loading the teacher;
* a live classifier teacher (``teacher.kind=classifier``): ``logits``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pand.cache.integrity import CacheDamagedError
from pand.cache.teacher import CachedTeacherSource, TeacherCache, cache_record
from pand.distillers import Distiller, TeacherContext
from pand.engine.data import PandDataModule
from pand.errors import ConfigError, MismatchError, PandError
from pand.teachers import (
    IMAGE_EMBEDS,
    LOGITS,
    LiveTeacherSource,
    ZeroShotLogits,
    load_classifier_teacher,
    load_clip_teacher,
)
from pand.validation import validate_train_config

TEACHER_KINDS = ("clip", "classifier")


def teacher_kind(config: Mapping[str, Any]) -> str:
    return (config.get("teacher") or {}).get("kind", "clip")


def teacher_provides(config: Mapping[str, Any]) -> frozenset[str]:
    """The per-sample outputs the configured teacher side can deliver (checked before anything is loaded)."""
    if teacher_kind(config) == "classifier":
        return frozenset({LOGITS})
    return frozenset({IMAGE_EMBEDS, LOGITS})


def _default_device(config: Mapping[str, Any]) -> str:
    accelerator = config.get("trainer", {}).get("accelerator")
    return "cuda" if torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto") else "cpu"


def load_teacher_from(config: Mapping[str, Any], device: str | None = None, classes: list[str] | None = None):
    """The configured teacher, on ``device`` (default: the GPU when the trainer may use one).

    A classifier teacher (``teacher.kind=classifier``) is checked against ``classes``, the run's class list.
    """
    t = config["teacher"]
    device = device or _default_device(config)
    if teacher_kind(config) == "classifier":
        if classes is None:
            raise ConfigError("a classifier teacher is loaded for a run's classes; none were given")
        return load_classifier_teacher(t, classes=classes, data=config["data"], device=device)
    return load_clip_teacher(
        t["model"], t.get("pretrained"), logit_scale=t.get("logit_scale"), cache_dir=t.get("cache_dir"),
        device=device, force_quick_gelu=bool(t.get("force_quick_gelu", False)),
    )


def load_prompt_embeds(path: str | None, teacher_identity: Mapping[str, str], classes: list[str]) -> torch.Tensor | None:
    """Learned CoOp text features from ``pand prompts``, refused if made with another teacher or class list."""
    if not path:
        return None
    from pand.prompts.store import load_text_features

    return load_text_features(path, teacher_identity, classes)


def teacher_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher as configured: what a teacher cache must have been built with (checked without loading it)."""
    t = config["teacher"]
    return {"model": t["model"], "pretrained": t.get("pretrained"), "force_quick_gelu": bool(t.get("force_quick_gelu"))}


def cache_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    cache = dict(config.get("cache") or {})
    return cache if cache.get("dir") and int(cache.get("views", 0)) > 0 else None


def open_or_build_cache(config: Mapping[str, Any], data: PandDataModule, teacher=None, rank: int = 0,
                        world_size: int = 1, barrier=None) -> TeacherCache | None:
    """The run's teacher cache: opened if it matches, built (or resumed) with the live teacher if not.

    Returns None on a process that built only its share and is not the one that completes the cache.
    """
    settings = cache_settings(config)
    train = data.splits["train"]
    templates = list(config["data"]["templates"])
    expected = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                            views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates)
    try:
        return TeacherCache.open(settings["dir"], expected)
    except (MismatchError, CacheDamagedError):
        if not settings.get("rebuild"):
            raise
    except PandError:
        pass  # missing or incomplete: build / resume below
    teacher = teacher or load_teacher_from(config)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    return TeacherCache.build(
        settings["dir"], expected, train, data.augment, source, teacher.class_embeddings(train.classes, templates),
        teacher.identity, embed_dim=teacher.embed_dim, learned_logit_scale=float(teacher.model.logit_scale.exp()),
        batch_size=int(settings.get("batch_size", 64)), rank=rank, world_size=world_size,
        rebuild=bool(settings.get("rebuild")), barrier=barrier,
    )


def build_cache(config: Mapping[str, Any]) -> TeacherCache | None:
    """``pand cache build``: one process, or each process of a ``torchrun`` launch building its share."""
    if not cache_settings(config):
        raise ConfigError("set cache.dir=/path/to/cache and cache.views=K (> 0) to build a teacher cache")
    validate_train_config(config, for_cache_build=True)
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return open_or_build_cache(config, data)
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        teacher = load_teacher_from(config)
        return open_or_build_cache(config, data, teacher, rank=rank, world_size=world, barrier=_all_ok)
    finally:
        dist.destroy_process_group()


def _all_ok(ok: bool = True) -> bool:
    """A barrier that also tells every process whether all of them got there without an error."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def build_teacher_side(
    config: Mapping[str, Any], data: PandDataModule, method: type[Distiller]
) -> tuple[TeacherContext | None, nn.Module | None]:
    """The class-level teacher data and the per-sample source ``method`` reads; ``(None, None)`` if it reads none.

    The teacher is loaded only when no teacher cache covers what the method reads.
    """
    if not method.requires and not method.needs_text_embeds:
        return None, None
    missing = method.requires - teacher_provides(config)
    if missing:
        raise ConfigError(f"method {method.name!r} reads {sorted(missing)}, which a teacher.kind={teacher_kind(config)} "
                          f"teacher does not provide (it provides {sorted(teacher_provides(config))})")
    if teacher_kind(config) == "classifier":
        teacher = load_teacher_from(config, classes=data.classes)
        context = TeacherContext(identity=teacher.identity, num_classes=teacher.num_classes)
        return context, LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    return _clip_side(config, data, method)


def _clip_side(config: Mapping[str, Any], data: PandDataModule, method: type[Distiller]):
    classes = data.classes
    text_features = config["teacher"].get("text_features")
    wants_logits = LOGITS in method.requires
    source: nn.Module | None = None
    if method.requires and cache_settings(config):
        cache = open_or_build_cache(config, data)
        data.teacher_cache = cache
        scale = config["teacher"].get("logit_scale")
        context = TeacherContext(
            embed_dim=int(cache.meta["embed_dim"]),
            logit_scale=float(cache.meta["learned_logit_scale"]) if scale in (None, "learned") else float(scale),
            text_embeds=cache.text_embeds(), identity=cache.meta["teacher"],
            prompt_embeds=load_prompt_embeds(text_features, cache.meta["teacher"], classes),
        )
        source = CachedTeacherSource(cache)
    else:
        teacher = load_teacher_from(config)
        needs_text = method.needs_text_embeds or wants_logits
        text = teacher.class_embeddings(classes, list(config["data"]["templates"])) if needs_text else None
        context = TeacherContext(
            embed_dim=teacher.embed_dim, logit_scale=teacher.logit_scale,
            text_embeds=None if text is None else text.cpu(), identity=teacher.identity,
            prompt_embeds=load_prompt_embeds(text_features, teacher.identity, classes),
        )
        if method.requires:
            source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    if wants_logits:
        # The CLIP teacher's classifier: learned CoOp features when given, else the template embeddings.
        text = context.prompt_embeds if context.prompt_embeds is not None else context.text_embeds
        source = ZeroShotLogits(source, text, context.logit_scale)
    return context, source
