"""The teacher side of a run, built in one place from the config: which teacher, live or cached, and the class-level
data (text embeddings, learned prompts) a method reads.

:func:`build_teacher_side` returns the :class:`~pand.distillers.TeacherContext` and the source of per-sample teacher
outputs that the method declared (``Distiller.requires``), from

* a live CLIP teacher (``teacher.kind=clip``): ``image_embeds``, and ``logits`` from them with the class text matrix
  (template embeddings, or learned CoOp features when ``teacher.text_features`` is set);
* the teacher cache of a CLIP teacher (``cache.dir``): the same outputs, read from disk, without loading the teacher;
* a live classifier teacher (``teacher.kind=classifier``): ``logits``;
* the teacher cache of a classifier teacher: its ``logits`` per cached view, without loading it;

and, from a live teacher of either kind, ``stage_features`` (never cached). A method that trains modules inside the
teacher (``needs_teacher_model``, PAT) also gets the live teacher model in its context.
"""

from __future__ import annotations

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
    STAGE_FEATURES,
    LiveTeacherSource,
    ZeroShotLogits,
    load_classifier_teacher,
    load_clip_teacher,
)
from pand.teachers.precision import DEFAULT_TOLERANCE

TEACHER_KINDS = ("clip", "classifier")


def teacher_kind(config: Mapping[str, Any]) -> str:
    return (config.get("teacher") or {}).get("kind", "clip")


def teacher_provides(config: Mapping[str, Any]) -> frozenset[str]:
    """The per-sample outputs the configured teacher side can deliver (checked before anything is loaded)."""
    if teacher_kind(config) == "classifier":
        return frozenset({LOGITS, STAGE_FEATURES})
    return frozenset({IMAGE_EMBEDS, LOGITS, STAGE_FEATURES})


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
    teacher = load_clip_teacher(
        t["model"], t.get("pretrained"), logit_scale=t.get("logit_scale"), cache_dir=t.get("cache_dir"),
        device=device, force_quick_gelu=bool(t.get("force_quick_gelu", False)),
    )
    teacher.use_stages(t.get("stages"))
    return teacher


def load_prompt_embeds(path: str | None, teacher_identity: Mapping[str, str], classes: list[str]) -> torch.Tensor | None:
    """Learned CoOp text features from ``pand prompts``, refused if made with another teacher or class list."""
    if not path:
        return None
    from pand.prompts.store import load_text_features

    return load_text_features(path, teacher_identity, classes)


def teacher_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher as configured: what a teacher cache must have been built with (checked without loading it).

    A classifier's weights file (``teacher.weights`` or ``teacher.ckpt``) is named by its resolved path and the
    blake2b digest of its content: ``best.ckpt`` is rewritten in place while its run trains on, and a cache of the
    old weights must then be refused although the path is the same. Hashing reads the file once (~0.6 GB/s).
    """
    t = config["teacher"]
    if teacher_kind(config) != "classifier":
        return {"kind": "clip", "model": t["model"], "pretrained": t.get("pretrained"),
                "force_quick_gelu": bool(t.get("force_quick_gelu"))}
    from pathlib import Path

    from pand.cache.integrity import file_digest

    ckpt, weights = t.get("ckpt"), t.get("weights")
    path = Path(ckpt or weights).expanduser().resolve() if (ckpt or weights) else None
    # A pand checkpoint brings its own network, input size and normalisation; the config's are then ignored.
    own = {} if ckpt else {"model": t.get("model"), "source": t.get("source", "auto"),
                           "image_size": t.get("image_size"), "mean": t.get("mean"), "std": t.get("std")}
    return {"kind": "classifier", **own, "ckpt": str(path) if ckpt else None,
            "weights": str(path) if weights else None, "pretrained": t.get("pretrained"),
            "file_digest": file_digest(path) if path is not None and path.is_file() else None}


def cache_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    cache = dict(config.get("cache") or {})
    return cache if cache.get("dir") and int(cache.get("views", 0)) > 0 else None


def open_or_build_cache(config: Mapping[str, Any], data: PandDataModule, teacher=None, rank: int = 0,
                        world_size: int = 1, barrier=None) -> TeacherCache | None:
    """The run's teacher cache: opened if it matches, built (or resumed) with the live teacher if not.

    Returns None on a process that built only its share and is not the one that completes the cache.
    ``cache.precision`` (fp32 unless set) is part of what must match; a bf16 / fp16 build is checked against fp32
    on its first batch within ``cache.precision_tolerance`` (see :mod:`pand.cache.teacher`).
    """
    settings = cache_settings(config)
    train = data.train_pool
    classifier = teacher_kind(config) == "classifier"
    templates = None if classifier else list(config["data"]["templates"])
    expected = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                            views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates,
                            outputs=[LOGITS] if classifier else [IMAGE_EMBEDS],
                            topk=settings.get("topk") if classifier else None,
                            precision=settings.get("precision") or "fp32")
    try:
        return TeacherCache.open(settings["dir"], expected)
    except (MismatchError, CacheDamagedError):
        if not settings.get("rebuild"):
            raise
    except PandError:
        pass  # missing or incomplete: build / resume below
    teacher = teacher or load_teacher_from(config, classes=train.classes)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    if classifier:
        text, clip = None, {}  # logits need no class text, and their scale is the teacher's own
    else:
        text = teacher.class_embeddings(train.classes, templates)
        clip = {"embed_dim": teacher.embed_dim, "learned_logit_scale": float(teacher.model.logit_scale.exp())}
    return TeacherCache.build(
        settings["dir"], expected, train, data.augment, source, text, teacher.identity, **clip,
        batch_size=int(settings.get("batch_size", 64)), rank=rank, world_size=world_size,
        rebuild=bool(settings.get("rebuild")), barrier=barrier, augment_on=data.augment_on,
        num_workers=int(settings.get("num_workers", 0)),
        precision_tolerance=float(settings.get("precision_tolerance", DEFAULT_TOLERANCE)),
    )


def build_teacher_side(
    config: Mapping[str, Any], data: PandDataModule, method: type[Distiller]
) -> tuple[TeacherContext | None, nn.Module | None]:
    """The class-level teacher data and the per-sample source ``method`` reads; ``(None, None)`` if it reads none.

    The teacher is loaded only when no teacher cache covers what the method reads.
    """
    reads = method.requires_for(config.get("method") or {})
    if not method.uses_teacher_with(reads):
        return None, None
    missing = reads - teacher_provides(config)
    if missing:
        raise ConfigError(f"method {method.name!r} reads {sorted(missing)}, which a teacher.kind={teacher_kind(config)} "
                          f"teacher does not provide (it provides {sorted(teacher_provides(config))})")
    if teacher_kind(config) == "classifier" and reads and cache_settings(config):
        context, source = _classifier_cache_side(config, data, method, reads)
    elif teacher_kind(config) == "classifier":
        teacher = load_teacher_from(config, classes=data.classes)
        context = TeacherContext(identity=teacher.identity, num_classes=teacher.num_classes)
        source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    else:
        context, source = _clip_side(config, data, method, reads)
    if STAGE_FEATURES in reads or method.needs_teacher_model:
        _add_live_teacher(context, source, config, method)
    return context, source


def live_source(source: nn.Module | None) -> LiveTeacherSource | None:
    """The live teacher inside a per-sample source (possibly wrapped in ZeroShotLogits); None for a cache."""
    while source is not None and not isinstance(source, LiveTeacherSource):
        source = getattr(source, "inner", None)
    return source


def _add_live_teacher(context: TeacherContext, source: nn.Module, config: Mapping[str, Any],
                      method: type[Distiller]) -> None:
    """Stage names and shapes for methods reading stage features; the teacher model itself for those training
    modules inside it. Both need the live teacher, which ``source`` wraps (possibly inside ZeroShotLogits)."""
    live = live_source(source)
    if live is None:
        raise ConfigError(f"method {method.name!r} needs the live teacher (stage features or modules inside the "
                          "teacher), which a teacher cache cannot stand in for; remove cache.dir")
    add_stages(context, live, int(config["data"]["image_size"]), with_model=method.needs_teacher_model)


def add_stages(context: TeacherContext, live: LiveTeacherSource, image_size: int, *, with_model: bool) -> None:
    """Fill ``context`` with the live teacher's stage names and shapes at ``image_size`` px (and the model itself,
    ``with_model``, for a method training modules inside it)."""
    teacher = live.teacher
    context.stage_names = teacher.stage_names
    context.stage_shapes = teacher.stage_shapes(image_size)
    context.input_mean, context.input_std = tuple(live.mean), tuple(live.std)
    if with_model:
        context.teacher = teacher


def _clip_side(config: Mapping[str, Any], data: PandDataModule, method: type[Distiller], reads: frozenset[str]):
    classes = data.classes
    text_features = config["teacher"].get("text_features")
    wants_logits = LOGITS in reads
    source: nn.Module | None = None
    teacher = None
    if reads and cache_settings(config):
        # logits come from the cached embeddings through ZeroShotLogits below
        _check_cache_covers(method, reads, frozenset({IMAGE_EMBEDS, LOGITS}))
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
        if reads:
            source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    if method.reads_text_tokens(config.get("method") or {}):
        # Per-token prompt features are class-level data a teacher cache does not hold: with a cache, the teacher is
        # loaded for this once (its image tower never runs).
        teacher = teacher or load_teacher_from(config)
        context.text_tokens, context.text_token_mask = teacher.class_token_features(
            classes, list(config["data"]["templates"]))
    if wants_logits:
        # The CLIP teacher's classifier: learned CoOp features when given, else the template embeddings.
        text = context.prompt_embeds if context.prompt_embeds is not None else context.text_embeds
        source = ZeroShotLogits(source, text, context.logit_scale)
    return context, source


def label_val_with_teacher(config: Mapping[str, Any], data: PandDataModule, context: TeacherContext | None,
                           source: nn.Module | None) -> None:
    """Label a label-free run's val images with the teacher's top-1 class, so that ``val/acc1`` (and with it the
    choice of ``best.ckpt``) measures how often the student agrees with its teacher.

    The classifier is the one the student distils from: a classifier teacher's own head, or a CLIP teacher's text
    matrix (learned CoOp features when ``teacher.text_features`` is set, else the template embeddings). A run training
    from the teacher cache loads the teacher for this one pass over the val images.
    """
    live = live_source(source)
    teacher = live.teacher if live is not None else load_teacher_from(config, classes=data.classes)
    mean, std = config["data"]["mean"], config["data"]["std"]
    labeller: nn.Module = LiveTeacherSource(teacher, mean, std)
    if teacher_kind(config) != "classifier":
        text = None if context is None else (
            context.prompt_embeds if context.prompt_embeds is not None else context.text_embeds)
        if text is None:
            text = teacher.class_embeddings(data.classes, list(config["data"]["templates"]))
        scale = context.logit_scale if context is not None and context.logit_scale else teacher.logit_scale
        labeller = ZeroShotLogits(labeller, text.to(teacher.device), scale)
    labels = []
    for batch in data.eval_dataloader("val"):
        logits = labeller({"image": batch["image"].to(teacher.device)}, {LOGITS})[LOGITS]
        labels += logits.argmax(-1).tolist()
    data.set_val_labels(labels)


def _check_cache_covers(method: type[Distiller], reads: frozenset[str], holds: frozenset[str]) -> None:
    """Refuse, before a cache is opened or built, a method reading what no teacher cache holds."""
    beyond = reads - holds
    if beyond or method.needs_teacher_model:
        what = f"reads {sorted(beyond)}" if beyond else "trains modules inside the teacher"
        raise ConfigError(f"method {method.name!r} {what}, which a teacher cache does not hold (it holds "
                          f"{sorted(holds)}): it needs the live teacher; remove cache.dir")


def _classifier_cache_side(config: Mapping[str, Any], data: PandDataModule, method: type[Distiller],
                           reads: frozenset[str]) -> tuple[TeacherContext, nn.Module]:
    """A classifier teacher's logits from the teacher cache (built first if missing); the teacher is not loaded."""
    _check_cache_covers(method, reads, frozenset({LOGITS}))
    cache = open_or_build_cache(config, data)
    data.teacher_cache = cache
    context = TeacherContext(identity=dict(cache.meta["teacher"]), num_classes=len(cache.meta["classes"]))
    return context, CachedTeacherSource(cache)
