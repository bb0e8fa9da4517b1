"""Training images nobody labelled, and the training pool that puts them next to the labelled ones.

Every teacher-driven loss can learn from an image without a label; only the cross-entropy term needs one. A run
names its unlabelled images with ``data.unlabelled``:

* ``rest``: the official training images outside the labelled pool of ``data.samples_per_class`` (their labels are
  hidden, never read);
* a folder: every image file under it, in any layout (searched recursively; sub-folder names are not read as labels;
  no link may lead out of it, and none of its images may be a val or test image: see :mod:`pand.data.overlap`);
* ``wds:<pattern>``: the images of WebDataset tar shards, ``wds:/data/{00000..00099}.tar`` (read by index, see
  :mod:`pand.data.tar_shards`; their ``cls`` labels are not read);
* ``null``: none.

An unlabelled item has the label :data:`UNLABELLED` (-1). :class:`TrainingPool` indexes the labelled images first
(``0 .. n_labelled - 1``), then the unlabelled ones, so one index addresses a training image for the sampler, the
data loader and the teacher cache alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pand.data.base import ClassificationDataset, FileDataset, SubsetDataset
from pand.data.tar_shards import ShardDataset, expand_braces, is_shard_pattern, read_shards
from pand.data.walk import check_input_root, listed, reads, walk
from pand.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger("pand")

#: The label of a training image without one.
UNLABELLED = -1


class HiddenLabels(SubsetDataset):
    """``dataset`` with every label replaced by :data:`UNLABELLED` (the images and their identity unchanged).

    A subset of all of ``dataset``'s items, so that whatever unwraps subsets (image verification, the decoded-image
    cache) reaches the files or arrays underneath.
    """

    def __init__(self, dataset: ClassificationDataset, split: str = "unlabelled") -> None:
        super().__init__(dataset, range(len(dataset)), split=split)
        self.targets = [UNLABELLED] * len(dataset)


def base_names_only(dataset: ClassificationDataset, classes: Sequence[int]) -> HiddenLabels:
    """``dataset`` (labels hidden) as a split of a run on ``classes`` only: same images, and only those classes'
    names, so that nothing downstream can read the name of a class held out."""
    view = HiddenLabels(dataset, split=dataset.split)
    view.classes = [dataset.classes[c] for c in classes]
    return view


class TeacherLabelled(HiddenLabels):
    """Unlabelled images with labels given by the teacher (the val split of a label-free run)."""

    def __init__(self, dataset: ClassificationDataset, labels: Sequence[int]) -> None:
        super().__init__(dataset, split=dataset.split)
        n = len(self.classes)
        self.targets = [int(t) for t in labels]
        if any(not 0 <= t < n for t in self.targets):
            raise ValueError(f"teacher labels must lie in 0..{n - 1}")


def unlabelled_folder(folder: str | os.PathLike, classes: Sequence[str], name: str) -> ClassificationDataset:
    """Every image under ``folder`` (recursive, sorted paths) as unlabelled items of a run with ``classes``.

    The folder is the root of these images: a link leading out of it is refused (see :func:`pand.data.walk.walk`),
    as is a folder pand wrote; image files of a type pand does not read are named in one warning line (they change no
    score, but the user should know they are left out).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"data.unlabelled: folder {root} does not exist. Expected a folder of images in any layout (jpg, jpeg, "
            "png, bmp or webp files, searched recursively), or data.unlabelled=rest for the training images outside "
            "the labelled pool")
    check_input_root(root, "data.unlabelled")
    listing = walk(root, within=root)
    if not listing.files:
        raise DatasetNotFoundError(
            f"data.unlabelled: no image files under {root}: it holds {listing.types_held()}; pand reads {reads()}")
    unread = listing.unread_images()
    if unread:
        log.warning("data.unlabelled: %d image file%s under %s %s left out, of a type pand does not read (it reads "
                    "%s): %s", len(unread), "s" if len(unread) > 1 else "", root, "are" if len(unread) > 1 else "is",
                    reads(), listed([root / p for p in unread]))
    paths = listing.files
    return FileDataset(name, "unlabelled", classes, root, paths, [UNLABELLED] * len(paths))


def unlabelled_shards(pattern: str, classes: Sequence[str], name: str, *, skip_bad: bool = False) -> ShardDataset:
    """Every sample of the tar shards ``pattern`` names (``wds:...``, relative to the working folder) as unlabelled
    items of a run with ``classes``; with ``skip_bad``, truncated shards keep their complete samples and images that
    do not decode are left out (see :mod:`pand.data.tar_shards`)."""
    samples = read_shards(pattern, setting="data.unlabelled", skip_bad=skip_bad)
    return ShardDataset(name, "unlabelled", classes, samples, [UNLABELLED] * len(samples))


def choose(n: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of ``min(limit, n)`` of ``n`` items, a seeded choice (all of them when ``limit`` is None)."""
    if limit is None or int(limit) >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    return sorted(torch.randperm(n, generator=g)[: int(limit)].tolist())


class TrainingPool(ClassificationDataset):
    """The labelled training images, then the unlabelled ones, as one dataset (label -1 for the latter)."""

    def __init__(self, labelled: ClassificationDataset, unlabelled: ClassificationDataset) -> None:
        targets = list(labelled.targets) + [UNLABELLED] * len(unlabelled)
        super().__init__(labelled.name, "train", labelled.classes, targets, labelled.transform, labelled.root)
        self.labelled, self.unlabelled = labelled, unlabelled
        self.n_labelled, self.n_unlabelled = len(labelled), len(unlabelled)

    def _part(self, i: int) -> tuple[ClassificationDataset, int]:
        i = self._check_index(i)
        return (self.labelled, i) if i < self.n_labelled else (self.unlabelled, i - self.n_labelled)

    def load_image(self, i: int) -> Image.Image:
        part, j = self._part(i)
        return part.load_image(j)

    def sample_id(self, i: int) -> str:
        part, j = self._part(i)
        return part.sample_id(j) if part is self.labelled else f"unlabelled:{part.sample_id(j)}"

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        ours = [i for i in indices if i < self.n_labelled]
        theirs = [i - self.n_labelled for i in indices if i >= self.n_labelled]
        if ours:
            self.labelled._hash_items(h, ours)
        if theirs:
            h.update(b"\0unlabelled\0")
            self.unlabelled._hash_items(h, theirs)


def check_unlabelled_setting(value: Any, samples_per_class: Any) -> str | None:
    """``rest``, a folder path, a ``wds:`` shard pattern, or None, from ``data.unlabelled`` (``none``/``null``/empty
    mean None)."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    value = str(value)
    if is_shard_pattern(value):
        try:  # a malformed pattern is refused with the other settings, before anything loads
            expand_braces(value)
        except ConfigError as err:
            raise ConfigError(f"data.unlabelled: {err}") from None
    if value == "rest" and samples_per_class is None:
        raise ConfigError("data.unlabelled=rest means the training images outside the labelled pool; set "
                          "data.samples_per_class=K (K labelled images per class, 0 for none) to have a rest")
    return value
