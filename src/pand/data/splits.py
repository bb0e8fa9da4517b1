"""One split of one dataset: :func:`get_dataset` (the one entry point) and the seeded :func:`stratified_split`.

Every dataset exposes ``train``, ``val`` and ``test``. ``test`` is the official test split (for ImageNet, whose test
labels are not public, the official val split that papers report). ``val`` is the official validation split where one
exists (FGVC-Aircraft; an image folder with a ``val/`` folder); elsewhere ``val`` is a seeded, stratified
``val_fraction`` of the official training split and ``train`` is the rest, so train and val never overlap and together
make up the official training split.

How a run's splits are put together from these (few-shot pools, unlabelled images, base/novel classes) is
:mod:`pand.data.assembly`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from pand.data.base import ClassificationDataset, subset
from pand.data.registry import get_dataset_kind, list_datasets
from pand.errors import ConfigError

SPLITS = ("train", "val", "test")


def base_novel_classes(num_classes: int, seed: int) -> tuple[list[int], list[int]]:
    """The CoOp / CoCoOp base-to-novel protocol's class halves: a seeded half of the labels (the larger half when
    the count is odd) as base classes, the rest as novel, both sorted."""
    if num_classes < 2:
        raise ConfigError(f"a base-to-novel split needs at least 2 classes, the data has {num_classes}")
    order = np.random.default_rng(int(seed)).permutation(num_classes)
    half = (num_classes + 1) // 2
    return sorted(int(c) for c in order[:half]), sorted(int(c) for c in order[half:])


def stratified_split(targets: Iterable[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into ``(kept, held_out)``, holding out ``fraction`` of every class.

    Per class with ``n`` items, ``round(fraction * n)`` items are held out (rounding half up), at least 1 when
    ``n >= 2`` and ``fraction > 0``, and at most ``n - 1`` when ``n >= 2`` so no class vanishes from ``kept``; a class
    with a single item stays in ``kept``. Which items are held out is drawn with ``numpy.random.default_rng(seed)``
    class by class in label order, so the result depends only on ``targets``, ``fraction`` and ``seed``. Both lists
    are sorted.
    """
    if hasattr(targets, "tolist"):
        targets = targets.tolist()
    y = np.asarray(list(targets), dtype=np.int64).reshape(-1)
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(int(seed))
    held: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = len(idx)
        k = int(math.floor(fraction * n + 0.5))
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        if k:
            held.extend(int(i) for i in rng.permutation(idx)[:k])
    held_set = set(held)
    kept = [i for i in range(len(y)) if i not in held_set]
    return kept, sorted(held)


def get_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Callable[[Any], Any] | None = None,
    *,
    download: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    num_classes: int | None = None,
    class_names_file: str | os.PathLike | None = None,
    options: Mapping[str, Any] | None = None,
) -> ClassificationDataset:
    """Build split ``split`` of dataset ``name`` stored under ``root``.

    Args:
        name: a registered dataset (:func:`pand.data.registry.list_datasets`, also :data:`pand.data.DATASET_NAMES`).
        root: the dataset folder itself, or its parent holding the standard folder name (e.g. ``CUB_200_2011``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to the RGB PIL image by ``__getitem__``.
        download: fetch and extract the official archives into ``root`` if the dataset is not there.
        val_fraction, split_seed: size and seed of the validation part carved from the official training split
            (ignored where an official validation split exists).
        num_classes: if given, must equal the number of classes found (ConfigError otherwise).
        class_names_file: display names for ``imagefolder`` or ``imagenet`` classes (see :mod:`pand.data.imagefolder`,
            :mod:`pand.data.imagenet`).
        options: the dataset's own settings (:attr:`~pand.data.registry.DatasetKind.options`, e.g. the shard patterns
            of ``shards``), by name.

    Raises:
        ConfigError: unknown name or split, bad ``val_fraction``, a class count mismatch.
        DatasetNotFoundError: a file or folder is missing (the message shows the expected layout).
    """
    kind = get_dataset_kind(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if class_names_file is not None and not kind.takes_class_names_file:
        takers = " and ".join(sorted(n for n in list_datasets() if get_dataset_kind(n).takes_class_names_file))
        raise ConfigError(f"class_names_file is only supported for {takers} datasets, not {name!r}")
    root = os.path.expanduser(os.fspath(root))
    own = dict(options or {})
    unknown = sorted(set(own) - set(kind.options))
    if unknown:
        takes = f"its settings are {', '.join(kind.options)}" if kind.options else "it has no setting of its own"
        raise ConfigError(f"dataset {name!r} has no setting {', '.join(unknown)} ({takes})")
    opts: dict[str, Any] = {"download": download, **own}
    if kind.takes_class_names_file:
        opts["class_names_file"] = class_names_file

    if split == "test" or kind.has_official_val(root, **own):
        ds = kind.load(root, split, **opts)
    else:
        full = kind.load(root, "train", **opts)
        kept, held = stratified_split(full.targets, val_fraction, split_seed)
        ds = subset(full, kept if split == "train" else held, split=split)

    if num_classes is not None and int(num_classes) != len(ds.classes):
        raise ConfigError(
            f"num_classes={num_classes} but the {name} dataset at {ds.root or root} has {len(ds.classes)} classes; "
            "fix num_classes (or the dataset root)"
        )
    ds.transform = transform
    return ds
