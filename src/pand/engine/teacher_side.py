"""The teacher side of a run, built in one place from the config: which teacher, live or cached, and the class-level
data (text embeddings, learned prompts) a method reads.

:func:`build_teacher_side` returns the :class:`~pand.distillers.TeacherContext` and the source of per-sample teacher
outputs that the method declared (``Distiller.requires``). What each teacher kind provides, caches and puts in the
context is declared by the kind (:mod:`pand.teachers.registry`); the two kinds pand ships give

* a live CLIP teacher (``teacher.kind=clip``): ``image_embeds``, and ``logits`` from them with the class text matrix
  (template embeddings, or learned CoOp features when ``teacher.text_features`` is set);
* the teacher cache of a CLIP teacher (``cache.dir``): the same outputs, read from disk, without loading the teacher;
* a live classifier teacher (``teacher.kind=classifier``): ``logits``;
* the teacher cache of a classifier teacher: its ``logits`` per cached view, without loading it;

and, from a live teacher of either kind, ``stage_features`` (never cached). A method that trains modules inside the
teacher (``needs_teacher_model``, PAT) also gets the live teacher model in its context.

When the training images have captions (``data=captions``), a teacher with a text tower embeds every one of them once
per run (no template), for methods that read them (``Distiller.reads_captions``: ``method.caption_weight``); its cache
stores them beside the class text and is refused when made for another caption list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pand.cache.integrity import CacheDamagedError
from pand.cache.teacher import CachedTeacherSource, TeacherCache, cache_record
from pand.config import teacher_cache_settings
from pand.data.captions import CaptionTable
from pand.distillers import Distiller, TeacherContext
from pand.engine.config_checks import cache_refusals
from pand.engine.data import PandDataModule
from pand.engine.launch import all_ok, join_launch, launched_ranks
from pand.errors import ConfigError, MismatchError, PandError
from pand.stage1.store import load_text_features
from pand.teachers import (
    LOGITS,
    STAGE_FEATURES,
    LiveTeacherSource,
    ZeroShotLogits,
)
from pand.teachers.precision import DEFAULT_TOLERANCE
from pand.teachers.registry import kind_of, load_teacher


def load_prompt_embeds(path: str | None, teacher_identity: Mapping[str, str], classes: list[str]) -> torch.Tensor | None:
    """Learned CoOp text features from ``pand prompts``, refused if made with another teacher or class list."""
    if not path:
        return None
    return load_text_features(path, teacher_identity, classes)


def caption_embeddings(teacher, table: CaptionTable) -> torch.Tensor:
    """The teacher's embeddings of a caption table's texts as the context and a teacher cache hold them (float16,
    so that a run reading them live and one reading them from its cache train on the same numbers)."""
    return teacher.caption_embeddings(list(table.texts)).half()


def teacher_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher as configured: what a teacher cache must have been built with (checked without loading it)."""
    return kind_of(config).spec(config["teacher"])


def open_or_build_cache(config: Mapping[str, Any], data: PandDataModule, teacher=None, rank: int = 0,
                        world_size: int = 1, barrier=None) -> TeacherCache | None:
    """The run's teacher cache: opened if it matches, built (or resumed) with the live teacher if not.

    Returns None on a process that built only its share and is not the one that completes the cache.
    ``cache.precision`` (fp32 unless set) is part of what must match; a bf16 / fp16 build is checked against fp32
    on its first batch within ``cache.precision_tolerance`` (see :mod:`pand.cache.teacher`).
    """
    settings = teacher_cache_settings(config)
    train = data.train_pool
    kind = kind_of(config)
    reads_templates = kind.has_text if kind.reads_templates is None else kind.reads_templates
    templates = list(config["data"]["templates"]) if reads_templates else None
    table = data.caption_table if kind.has_text else None
    expected = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                            views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates,
                            outputs=sorted(kind.cached),
                            topk=settings.get("topk") if LOGITS in kind.cached else None,
                            precision=settings.get("precision") or "fp32",
                            storage=settings.get("storage") or "float16",
                            captions=None if table is None else table.digest())
    try:
        return TeacherCache.open(settings["dir"], expected)
    except (MismatchError, CacheDamagedError):
        if not settings.get("rebuild"):
            raise
    except PandError:
        pass  # missing or incomplete: build / resume below
    teacher = teacher or load_teacher(config, classes=train.classes)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    text, record = kind.cache_contents(teacher, train.classes, templates)
    captions = None if table is None else caption_embeddings(teacher, table)
    return TeacherCache.build(
        settings["dir"], expected, train, data.augment, source, text, teacher.identity, **record,
        caption_embeds=captions,
        batch_size=int(settings.get("batch_size", 64)), rank=rank, world_size=world_size,
        rebuild=bool(settings.get("rebuild")), barrier=barrier, augment_on=data.augment_on,
        num_workers=int(settings.get("num_workers", 0)), shard_size=settings.get("shard_size"),
        precision_tolerance=float(settings.get("precision_tolerance", DEFAULT_TOLERANCE)),
    )


def _open_or_build_in_launch(config: Mapping[str, Any], data: PandDataModule) -> TeacherCache:
    """The run's cache; in a launch whose processes all exist already (:mod:`pand.engine.launch`) each builds its
    share of the missing shards, joining the launch's process group early, and all of them get the complete cache."""
    launch = launched_ranks(config)
    if launch is None:
        return open_or_build_cache(config, data)
    join_launch(*launch)
    return open_or_build_cache(config, data, rank=launch[0], world_size=launch[1], barrier=all_ok)


def build_teacher_side(
    config: Mapping[str, Any], data: PandDataModule, method: type[Distiller]
) -> tuple[TeacherContext | None, nn.Module | None]:
    """The class-level teacher data and the per-sample source ``method`` reads; ``(None, None)`` if it reads none.

    The teacher is loaded only when no teacher cache covers what the method reads.
    """
    options = config.get("method") or {}
    if data.caption_vocabulary and not method.embeds_images:
        raise ConfigError(f"data={config['data']['name']} holds image-caption pairs without classes, for an "
                          f"open-vocabulary student (method=openvocab); method {method.name!r} learns a classifier, "
                          "and the only classes of such a run are its val captions, kept for model selection")
    reads = method.requires_for(options)
    if not method.uses_teacher_with(reads):
        return None, None
    kind = kind_of(config)
    missing = reads - kind.provides
    if missing:
        raise ConfigError(f"method {method.name!r} reads {sorted(missing)}, which a teacher.kind={kind.name} "
                          f"teacher does not provide (it provides {sorted(kind.provides)})")
    teacher = None
    source: nn.Module | None = None
    cache_settings = teacher_cache_settings(config) if reads else None
    if cache_settings:
        refusals = cache_refusals(method, reads, kind, cache_settings["dir"])
        if refusals:  # before a cache is opened or built
            raise ConfigError(refusals[0])
        cache = _open_or_build_in_launch(config, data)
        data.teacher_cache = cache
        data.local_shards = bool(cache_settings.get("local_shards"))
        context = TeacherContext(**kind.context_from_cache(cache.meta, config["teacher"]))
        if kind.has_text:
            context.text_embeds = cache.text_embeds()
        if method.reads_captions(options) and data.caption_table is not None:
            context.caption_embeds = cache.caption_embeds()
        source = kind.from_cache(CachedTeacherSource(cache), config["teacher"])
    else:
        teacher = load_teacher(config, classes=data.classes)
        context = TeacherContext(**kind.context(teacher))
        if kind.has_text and (method.needs_text_embeds or LOGITS in reads):
            context.text_embeds = teacher.class_embeddings(data.classes, list(config["data"]["templates"])).cpu()
        if reads or method.needs_teacher_model:
            source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    if kind.has_text:
        source = _add_text_side(context, source, teacher, config, data, method, reads)
    if STAGE_FEATURES in reads or method.needs_teacher_model:
        _add_live_teacher(context, source, config, method)
    return context, source


def _add_text_side(context: TeacherContext, source: nn.Module | None, teacher, config: Mapping[str, Any],
                   data: PandDataModule, method: type[Distiller], reads: frozenset[str]) -> nn.Module | None:
    """The class-level data of a teacher with a text tower: learned prompts, per-token prompt features, and its
    zero-shot logits as the per-sample ``logits`` (``teacher`` is None when the cache stands in for it)."""
    classes = data.classes
    context.vocabulary_for_selection_only = data.caption_vocabulary
    context.prompt_embeds = load_prompt_embeds(config["teacher"].get("text_features"), context.identity, classes)
    if method.reads_captions(config.get("method") or {}) and context.caption_embeds is None:
        table = data.caption_table
        if table is None:
            raise ConfigError(f"method {method.name!r} with these options trains on the captions of the training "
                              f"images (method.caption_weight > 0), and the training images of "
                              f"data={config['data']['name']} have none; use a captions dataset (data=captions, or "
                              "data.unlabelled=captions:<folder> beside this one), or set method.caption_weight=0")
        teacher = teacher or load_teacher(config, classes=classes)
        context.caption_embeds = caption_embeddings(teacher, table)
    if method.reads_text_tokens(config.get("method") or {}):
        # Per-token prompt features are class-level data a teacher cache does not hold: with a cache, the teacher is
        # loaded for this once (its image tower never runs).
        teacher = teacher or load_teacher(config, classes=classes)
        context.text_tokens, context.text_token_mask = teacher.class_token_features(
            classes, list(config["data"]["templates"]))
    if LOGITS in reads:
        # The teacher's classifier: learned CoOp features when given, else the template embeddings.
        text = context.prompt_embeds if context.prompt_embeds is not None else context.text_embeds
        source = ZeroShotLogits(source, text, context.logit_scale)
    return source


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


def label_val_with_teacher(config: Mapping[str, Any], data: PandDataModule, context: TeacherContext | None,
                           source: nn.Module | None) -> None:
    """Label a label-free run's val images with the teacher's top-1 class, so that ``val/acc1`` (and with it the
    choice of ``best.ckpt``) measures how often the student agrees with its teacher.

    The classifier is the one the student distils from: a classifier teacher's own head, or a CLIP teacher's text
    matrix (learned CoOp features when ``teacher.text_features`` is set, else the template embeddings). A run training
    from the teacher cache loads the teacher for this one pass over the val images.
    """
    live = live_source(source)
    teacher = live.teacher if live is not None else load_teacher(config, classes=data.classes)
    mean, std = config["data"]["mean"], config["data"]["std"]
    labeller: nn.Module = LiveTeacherSource(teacher, mean, std)
    if kind_of(config).has_text:
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
