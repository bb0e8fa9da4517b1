"""One place that builds distillers by name, like timm's model registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pand.distillers.base import Distiller, TeacherContext
from pand.errors import ConfigError
from pand.students import Student

_REGISTRY: dict[str, type[Distiller]] = {}
D = TypeVar("D", bound=type[Distiller])


def register_distiller(name: str) -> Callable[[D], D]:
    def wrap(cls: D) -> D:
        if name in _REGISTRY:
            raise ValueError(f"distiller {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_distillers() -> list[str]:
    return sorted(_REGISTRY)


def get_distiller_class(name: str) -> type[Distiller]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_distillers())}") from None


def method_options(cls: type[Distiller]) -> set[str]:
    """The option names ``configs/method/<name>.yaml`` may set: the constructor's keywords."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "student", "num_classes", "context"}


def build_distiller(
    method: Mapping[str, Any], student: Student, num_classes: int, context: TeacherContext | None
) -> Distiller:
    """Build the distiller named ``method["name"]``; every other key of ``method`` is a constructor option."""
    options = dict(method)
    cls = get_distiller_class(options.pop("name"))
    accepted = method_options(cls)
    unknown = set(options) - accepted
    if unknown:
        raise ConfigError(f"method {cls.name!r} has no option(s) {sorted(unknown)}; its options are {sorted(accepted)}")
    return cls(student, num_classes, context, **options)
