"""One place that knows the teacher kinds (``teacher.kind=...``), like the registries of distillers and datasets.

A teacher kind is one module plus one config (``configs/teacher/<name>.yaml`` with ``kind: <name>``). The module
defines a :class:`TeacherKind` subclass decorated with :func:`register_teacher_kind`, declaring what the kind
provides and how it is built, cached and checked; the engine reads only these declarations, so it never compares
kind names. CONTRIBUTING.md ("Add a teacher kind") lists the steps.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pand.errors import ConfigError
from pand.rules import resolve_device

if TYPE_CHECKING:  # the registry stays light: the config checks read it before torch is loaded
    import torch

    from pand.teachers.frozen import FrozenTeacher

#: The modules that register a kind, imported when a kind is first asked for (importing them loads torch and
#: open_clip, which ``pand --help`` must not). Their order is the order kinds are listed in messages.
KIND_MODULES = ("pand.teachers.clip", "pand.teachers.classifier", "pand.teachers.ensemble")

#: ``teacher.kind`` when a config sets none.
DEFAULT_KIND = "clip"


class TeacherKind:
    """What a kind of teacher declares. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    #: Per-sample outputs (``pand.teachers`` keys) the live teacher delivers.
    provides: ClassVar[frozenset[str]]
    #: The per-sample outputs its teacher cache stores for each view.
    cached: ClassVar[frozenset[str]]
    #: What a method may read while training from that cache (a CLIP cache also serves logits, computed from the
    #: cached embeddings and the class text).
    served_from_cache: ClassVar[frozenset[str]]
    #: A text tower: class text embeddings, zero-shot logits from them, learned prompts (``teacher.text_features``).
    has_text: ClassVar[bool] = False
    #: Its outputs depend on the data's prompt templates (a text tower's, or an ensemble's CLIP members'): a teacher
    #: cache then records them and is refused for other templates. None: as ``has_text``.
    reads_templates: ClassVar[bool | None] = None
    #: The option of the ``teacher`` config group that holds the kind's default settings (None: the option named
    #: like the kind). A teacher ensemble fills in its members' settings from it, so that a member
    #: ``{kind: classifier, ckpt: X}`` is exactly ``teacher=classifier teacher.ckpt=X``.
    defaults_option: ClassVar[str | None] = None

    def load(self, teacher: Mapping[str, Any], *, data: Mapping[str, Any], classes: Sequence[str] | None,
             device: str | torch.device) -> FrozenTeacher:
        """The frozen teacher of a ``teacher`` config, on ``device``. ``classes``: the run's class list, or None
        where the caller has none (a kind that needs one refuses)."""
        raise NotImplementedError

    def spec(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        """The teacher as configured, read without loading it: what a teacher cache must have been built with."""
        raise NotImplementedError

    def setting_errors(self, teacher: Mapping[str, Any]) -> list[str]:
        """What is wrong with the ``teacher`` settings of a run that uses the teacher (checked before loading)."""
        return []

    def context(self, teacher: FrozenTeacher) -> dict[str, Any]:
        """Class-level fields of the distillers' teacher context, from the live teacher."""
        return {"identity": dict(teacher.identity)}

    def context_from_cache(self, meta: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
        """The same fields, from the record of a teacher cache (the teacher is not loaded)."""
        return {"identity": dict(meta["teacher"])}

    def from_cache(self, source: torch.nn.Module, teacher: Mapping[str, Any]) -> torch.nn.Module:
        """The per-sample source a method reads when ``source`` serves this kind's cached outputs (``cached``): what
        the kind serves beyond them is computed here (default: nothing, ``source`` itself)."""
        return source

    def cache_contents(self, teacher: FrozenTeacher, classes: Sequence[str],
                       templates: Sequence[str] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Class-level data a cache stores beside the per-view outputs: the class text matrix (or None) and the
        record entries that go with it."""
        return None, {}


_REGISTRY: dict[str, TeacherKind] = {}
K = TypeVar("K", bound=type[TeacherKind])


def register_teacher_kind(name: str) -> Callable[[K], K]:
    def wrap(cls: K) -> K:
        if name in _REGISTRY:
            raise ValueError(f"teacher kind {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return wrap


def teacher_kind_names() -> list[str]:
    for module in KIND_MODULES:
        importlib.import_module(module)
    return list(_REGISTRY)


def get_teacher_kind(name: str) -> TeacherKind:
    names = teacher_kind_names()
    if name not in _REGISTRY:
        raise ConfigError(f"teacher.kind={name!r} is not allowed: expected one of {', '.join(map(repr, names))}")
    return _REGISTRY[name]


def kind_of(config: Mapping[str, Any]) -> TeacherKind:
    """The kind of the configured teacher (``teacher.kind``, default ``clip``)."""
    return get_teacher_kind(str((config.get("teacher") or {}).get("kind", DEFAULT_KIND)))


def load_teacher(config: Mapping[str, Any], device: str | None = None,
                 classes: Sequence[str] | None = None) -> FrozenTeacher:
    """The teacher of a run's config, on ``device`` (default: the GPU when the trainer may use one).

    A kind that answers over a fixed class list (a classifier) is checked against ``classes``, the run's.
    """
    if device is None:
        accelerator = (config.get("trainer") or {}).get("accelerator")
        device = resolve_device("auto" if accelerator in ("gpu", "cuda", "auto") else "cpu")
    return kind_of(config).load(config["teacher"], data=config["data"], classes=classes, device=device)
