"""One place that finds datasets by name, like :mod:`pand.distillers.registry` does for methods.

A dataset is one module in ``pand/data/`` that follows :class:`DatasetModule` and decorates its ``load`` with
``@register_dataset("<name>")``, plus one config ``configs/data/<name>.yaml``; importing :mod:`pand.data` imports the
module and so registers it. :func:`pand.data.get_dataset` asks this registry, never a list of names.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol, TypeVar

from pand.data.base import ClassificationDataset
from pand.errors import ConfigError


class DatasetModule(Protocol):
    """The convention every dataset module follows (a module, not a class: tests monkeypatch its constants).

    Required:

    * ``TITLE``: the dataset's name in messages (``"CUB-200-2011"``).
    * ``LAYOUT``: the expected folder layout, shown by every "not found" error (see :func:`pand.data.base.not_found`).
    * ``HAS_OFFICIAL_VAL``: True when the dataset ships its own validation split, which ``load`` then serves as
      ``"val"``; else pand carves ``val`` from ``train`` (:func:`pand.data.splits.stratified_split`). A dataset whose
      folder may or may not hold a val split (``imagefolder``) defines ``has_official_val(root) -> bool`` instead.
    * ``load(root, split, *, download=False) -> ClassificationDataset``: an official split, ``"train"`` or ``"test"``
      (and ``"val"`` when the dataset has one), with ``split`` checked by :func:`pand.data.base.check_split`. A dataset
      that accepts display names for its classes adds the keyword ``class_names_file=None``; the registry reads that
      from the signature, so :func:`~pand.data.get_dataset` refuses ``class_names_file`` for every other dataset.
      Any other keyword (``shards``, ``skip_bad`` of :mod:`pand.data.shards`) is a ``data.*`` setting of the
      dataset's own (:attr:`DatasetKind.options`), passed from the run's config by that name; a folder-dependent
      ``has_official_val`` receives those of them it names too.
      ``load`` carries the ``@register_dataset("<name>")`` decorator, and ``<name>`` is the ``name`` of the datasets
      it returns and of ``configs/data/<name>.yaml``.

    A dataset without classes (image-caption pairs, :mod:`pand.data.captions`) also defines ``run_splits(data)``,
    which :mod:`pand.data.assembly` calls instead of building a run's splits from class labels.

    For datasets stored in one folder under ``root`` (used by :func:`pand.data.base.dataset_dir`):

    * ``FOLDER``: the standard folder name (``"CUB_200_2011"``); ``root`` may also be that folder itself.
    * ``MARKERS``: files or folders whose presence identifies the dataset folder.
    * ``download(root)``: fetch and extract the official archives under ``root`` (``load(download=True)`` calls it
      when the folder is missing). Datasets that cannot be downloaded raise a ConfigError or DatasetNotFoundError
      saying so, with ``LAYOUT``, instead.
    """

    TITLE: str
    LAYOUT: str

    def load(self, root: str | os.PathLike, split: str, *, download: bool = False) -> ClassificationDataset: ...


class DatasetKind:
    """A registered dataset: its name and module, and what :func:`~pand.data.get_dataset` needs to know of it."""

    def __init__(self, name: str, module: ModuleType) -> None:
        self.name = name
        self.module = module

    @property
    def takes_class_names_file(self) -> bool:
        return "class_names_file" in inspect.signature(self.module.load).parameters

    @property
    def options(self) -> tuple[str, ...]:
        """The ``data.*`` settings of the dataset's own: the keywords of its ``load`` besides ``download`` and
        ``class_names_file``."""
        return tuple(name for name, p in inspect.signature(self.module.load).parameters.items()
                     if p.kind is p.KEYWORD_ONLY and name not in ("download", "class_names_file"))

    def has_official_val(self, root: str | os.PathLike, **options: Any) -> bool:
        folder_dependent = getattr(self.module, "has_official_val", None)
        if folder_dependent is not None:
            named = inspect.signature(folder_dependent).parameters
            return bool(folder_dependent(root, **{k: v for k, v in options.items() if k in named}))
        return bool(self.module.HAS_OFFICIAL_VAL)

    def load(self, root: str | os.PathLike, split: str, **options: Any) -> ClassificationDataset:
        return self.module.load(root, split, **options)


# Insertion order is the order names are listed in messages.
_REGISTRY: dict[str, DatasetKind] = {}
L = TypeVar("L", bound=Callable[..., ClassificationDataset])


def register_dataset(name: str) -> Callable[[L], L]:
    """Register the module whose ``load`` this decorates as dataset ``name`` (see :class:`DatasetModule`)."""

    def wrap(load: L) -> L:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        module = sys.modules[load.__module__]
        # Checked here so that a module missing part of the protocol fails on import, not in the middle of a run.
        missing = [a for a in ("TITLE", "LAYOUT") if not hasattr(module, a)]
        if not hasattr(module, "HAS_OFFICIAL_VAL") and not hasattr(module, "has_official_val"):
            missing.append("HAS_OFFICIAL_VAL or has_official_val(root)")
        if missing:
            raise TypeError(f"dataset module {module.__name__} lacks {', '.join(missing)} (see DatasetModule)")
        _REGISTRY[name] = DatasetKind(name, module)
        return load

    return wrap


def list_datasets() -> tuple[str, ...]:
    """The registered dataset names, in registration order."""
    return tuple(_REGISTRY)


def get_dataset_kind(name: str) -> DatasetKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}") from None
