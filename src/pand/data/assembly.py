"""A run's splits from its data config (``cfg.data``): :func:`load_splits`.

On top of the official splits of :func:`~pand.data.get_dataset` this assembles what the config asks for: a few-shot
labelled pool (``data.samples_per_class=K``, val carved from the pool), unlabelled training images
(``data.unlabelled``: ``rest`` of the training split, a folder, ``wds:<pattern>`` for tar shards, or
``captions:<folder>`` for the training images of a captions dataset with their captions; at most
``data.unlabelled_limit``), a label-free run
(``data.samples_per_class=0``, :func:`label_free`) and the base-to-novel class split (``data.class_split``); a
dataset without classes (``data=captions``) assembles its own (``run_splits`` of its module). Every
choice is seeded by ``data.split_seed`` (``data.class_split_seed``), so the same config gives the same splits, bit
for bit. The splits are then checked for shared images and decoded once (:func:`load_splits`).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from pand.data.base import ClassificationDataset, restrict_classes, subset
from pand.data.captions import load as load_captions
from pand.data.captions import with_vocabulary
from pand.data.overlap import check_overlap
from pand.data.registry import get_dataset_kind
from pand.data.splits import base_novel_classes, get_dataset, stratified_split
from pand.data.tar_shards import is_shard_pattern
from pand.data.unlabelled import (
    UNLABELLED,
    HiddenLabels,
    base_names_only,
    check_unlabelled_setting,
    choose,
    unlabelled_folder,
    unlabelled_shards,
)
from pand.data.verify import verify_splits
from pand.data.walk import check_input_root
from pand.errors import ConfigError, PandError


def per_class_subset(targets: list[int], per_class: int, seed: int) -> list[int]:
    """Indices of ``per_class`` items of every class (all of a class that has fewer), chosen with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(y, []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        items = by_class[y]
        pick = torch.randperm(len(items), generator=g)[:per_class].tolist()
        chosen.extend(items[j] for j in pick)
    return sorted(chosen)


def load_splits(data: Mapping[str, Any], *, overlap: dict[str, int] | None = None) -> dict[str, ClassificationDataset]:
    """The train / val / test datasets a data config describes (few-shot pool included).

    The splits are compared by content first (:func:`~pand.data.overlap.check_overlap`): a val or test image that is
    also a training image stops the run unless ``data.allow_overlap=true``; ``overlap``, if given, receives the counts
    per pair of splits. Unless ``data.verify_images=false``, every image of every split is then decoded once
    (remembered per dataset fingerprint), so that a corrupt test image stops the run before training, not after it.
    """
    if data.get("root") not in (None, ""):
        check_input_root(data["root"], "data.root")
    splits = _load_splits(data)
    found = check_overlap(splits, allow=bool(data.get("allow_overlap", False)))
    if overlap is not None:
        overlap.clear()
        overlap.update(found)
    if data.get("verify_images", True):
        verify_splits(splits, progress=sys.stderr.isatty())
    return splits


#: The extra split of a base-to-novel run: test images of the classes never trained on, labelled among those classes.
NOVEL_TEST = "test_novel"


#: The protocols of a base-to-novel run with unlabelled training images (``data.novel_protocol``), and what each lets
#: training see of the novel classes. No protocol lets training or model selection read a novel label or class name.
NOVEL_PROTOCOLS = {
    "strict": "novel-class images were never seen in training; their names were not used for training or model "
              "selection (inductive)",
    "transductive": "unlabelled training images may show the novel classes (transductive, as in transductive "
                    "zero-shot learning; not comparable with inductive results); no novel label or name was used for "
                    "training or model selection",
    "generic": "unlabelled training images come from a folder (a generic corpus, data.unlabelled=<folder>), which may "
               "show any class; no novel label or name was used for training or model selection",
}


def novel_protocol(data: Mapping[str, Any]) -> str | None:
    """The protocol of a base-to-novel run (a key of :data:`NOVEL_PROTOCOLS`); None without a class split.

    ``strict`` (the default) keeps only base-class images among the unlabelled ``rest`` of the training split;
    ``transductive`` keeps them all, their labels hidden; unlabelled images from a folder are a ``generic`` corpus.
    """
    if data.get("class_split") != "base_novel":
        return None
    source = unlabelled_source(data)
    if source is None:
        return "strict"
    if source != "rest":
        return "generic"
    return str(data.get("novel_protocol") or "strict")


def _base_classes(data: Mapping[str, Any], num_classes: int) -> list[int] | None:
    if data.get("class_split") != "base_novel":
        return None
    return base_novel_classes(num_classes, int(data.get("class_split_seed", 0)))[0]


def classless(data: Mapping[str, Any]) -> bool:
    """Whether the run's dataset has no classes (image-caption pairs, ``data=captions``): it assembles its own splits,
    and the run's classes are its val captions, which serve model selection only."""
    return getattr(get_dataset_kind(data["name"]).module, "run_splits", None) is not None


#: ``data.unlabelled=captions:<folder>``: the training split of a captions dataset under that folder (any of its
#: layouts, detected; see :mod:`pand.data.captions`) as unlabelled images, with their captions (method.caption_weight).
CAPTIONS_POOL = "captions:"


def _unlabelled_from(source: str, classes: list[str], name: str, data: Mapping[str, Any]) -> ClassificationDataset:
    if source.startswith(CAPTIONS_POOL):
        pool = load_captions(source[len(CAPTIONS_POOL):], "train", skip_bad=bool(data.get("skip_bad", False)))
        return with_vocabulary(pool, classes, [UNLABELLED] * len(pool), split=UNLABELLED_SPLIT)
    if is_shard_pattern(source):
        return unlabelled_shards(source, classes, name, skip_bad=bool(data.get("skip_bad", False)))
    return unlabelled_folder(source, classes, name)


def _load_splits(data: Mapping[str, Any]) -> dict[str, ClassificationDataset]:
    if classless(data):
        # A dataset without classes (image-caption pairs) assembles its run itself: no labelled image, every training
        # image in the unlabelled pool, val scored by its own captions (see pand.data.captions).
        parts = get_dataset_kind(data["name"]).module.run_splits(data)
        return {"train": parts.train, "val": parts.val, "test": parts.test,
                UNLABELLED_SPLIT: _limit(parts.unlabelled, data)}
    splits = _labelled_splits(data)
    if data.get("class_split") != "base_novel":
        return splits
    # CoOp / CoCoOp base-to-novel: training and model selection see only the base classes' labels and names; "test"
    # is base test images among the base classes, "test_novel" novel test images among the novel ones. Splits whose
    # labels are hidden (unlabelled images, a label-free run's val) keep their images (chosen by the protocol in
    # _labelled_splits) and see only the base names.
    base, novel = base_novel_classes(len(splits["test"].classes), int(data.get("class_split_seed", 0)))
    hidden = {UNLABELLED_SPLIT, "val"} if label_free(data) else {UNLABELLED_SPLIT}
    out = {name: base_names_only(ds, base) if name in hidden else restrict_classes(ds, base)
           for name, ds in splits.items()}
    out[NOVEL_TEST] = restrict_classes(splits["test"], novel, split=NOVEL_TEST)
    return out


def _labelled_splits(data: Mapping[str, Any]) -> dict[str, ClassificationDataset]:
    name, root = data["name"], data["root"]
    common = dict(
        download=bool(data.get("download", False)),
        split_seed=int(data.get("split_seed", 0)),
        num_classes=data.get("num_classes"),
        class_names_file=data.get("class_names_file"),
        options={k: data[k] for k in get_dataset_kind(name).options if k in data},
    )
    k = data.get("samples_per_class")
    seed = int(data.get("split_seed", 0))
    source = unlabelled_source(data)
    test = get_dataset(name, root, "test", val_fraction=float(data["val_fraction"]), **common)
    if k is None:
        train = get_dataset(name, root, "train", val_fraction=float(data["val_fraction"]), **common)
        val = get_dataset(name, root, "val", val_fraction=float(data["val_fraction"]), **common)
        splits = {"train": train, "val": val, "test": test}
        if source is not None:  # a folder (rest needs a labelled pool; refused by unlabelled_source)
            splits[UNLABELLED_SPLIT] = _limit(_unlabelled_from(source, test.classes, name, data), data)
        return splits
    # Few-shot: a labelled pool of k images per class from the official training data; val is carved from the pool
    # so that model selection uses only labels the run is allowed to see.
    full = get_dataset(name, root, "train", val_fraction=0.0, **common)
    free = label_free(data)
    if not free:
        _check_every_class_has_images(full, int(k))
    chosen = per_class_subset(full.targets, int(k), seed)
    if source == "rest":
        taken = set(chosen)
        rest = [i for i in range(len(full)) if i not in taken]
        base = _base_classes(data, len(full.classes))
        if base is not None and novel_protocol(data) == "strict":
            kept = set(base)  # read here, before the labels are hidden, and never again
            rest = [i for i in rest if full.targets[i] in kept]
        extra = HiddenLabels(subset(full, rest))
    elif source is not None:
        extra = _unlabelled_from(source, full.classes, name, data)
    else:
        extra = None
    if free:
        return _label_free_splits(full, extra, test, data)
    pool = subset(full, chosen)
    keep, held = stratified_split(pool.targets, float(data["val_fraction"]), seed)
    if not held:
        raise ConfigError(
            f"data.samples_per_class={k} with data.val_fraction={data['val_fraction']} leaves no validation images"
        )
    splits = {"train": subset(pool, keep), "val": subset(pool, held, split="val"), "test": test}
    if extra is not None:
        splits[UNLABELLED_SPLIT] = _limit(extra, data)
    return splits


def _check_every_class_has_images(full: ClassificationDataset, k: int) -> None:
    """A class without a training image would get an empty labelled pool, trained and selected on without a word."""
    counts = Counter(full.targets)
    empty = [c for c in range(len(full.classes)) if not counts[c]]
    if empty:
        more = f" (and {len(empty) - 1} more: {', '.join(repr(full.classes[c]) for c in empty[1:4])}" \
               f"{', ...' if len(empty) > 4 else ''})" if len(empty) > 1 else ""
        raise PandError(
            f"data.samples_per_class={k}: class {full.classes[empty[0]]!r} has no image in the training split of "
            f"{full.name} at {full.root}{more}, so its labelled pool would be empty; add images of it, or use a "
            "dataset without that class")


#: The split of the unlabelled training images (``data.unlabelled``), next to train / val / test.
UNLABELLED_SPLIT = "unlabelled"


def unlabelled_source(data: Mapping[str, Any]) -> str | None:
    """``rest``, a folder, or None; a label-free run (``samples_per_class=0``) uses ``rest`` unless told otherwise."""
    source = check_unlabelled_setting(data.get("unlabelled"), data.get("samples_per_class"))
    return "rest" if source is None and label_free(data) else source


def label_free(data: Mapping[str, Any]) -> bool:
    """True when the run has no labelled training image at all (``data.samples_per_class=0``). Asked of unchecked
    configs too (by the config checks), so anything but the integer 0 (``false`` included) is not label-free."""
    k = data.get("samples_per_class")
    return isinstance(k, int) and not isinstance(k, bool) and k == 0


def _limit(dataset: ClassificationDataset, data: Mapping[str, Any]) -> ClassificationDataset:
    limit = data.get("unlabelled_limit")
    if limit is None or int(limit) >= len(dataset):
        return dataset
    return subset(dataset, choose(len(dataset), int(limit), int(data.get("split_seed", 0))))


def _label_free_splits(full: ClassificationDataset, extra: ClassificationDataset, test: ClassificationDataset,
                       data: Mapping[str, Any]) -> dict[str, ClassificationDataset]:
    """No labelled image: train is empty, val a seeded share of the unlabelled images that the teacher labels
    (:func:`pand.engine.teacher_side.label_val_with_teacher`), so model selection picks the student that agrees best
    with its teacher; the test split keeps its real labels."""
    n = len(extra)
    g = torch.Generator().manual_seed(int(data.get("split_seed", 0)) * 7_907 + 3)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = max(1, round(float(data["val_fraction"]) * n))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction={data['val_fraction']} of {n} unlabelled images leaves none to train on")
    held, rest = sorted(perm[:n_val]), sorted(perm[n_val:])
    return {
        "train": subset(full, [], split="train"),
        "val": HiddenLabels(subset(extra, held), split="val"),
        "test": test,
        UNLABELLED_SPLIT: _limit(subset(extra, rest), data),
    }
