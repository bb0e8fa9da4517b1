"""Labelled images in WebDataset tar shards (``data=shards``): each sample an image and its class index (``cls``).

Layout under ``data.root``: ``train/*.tar`` and ``test/*.tar``, optionally ``val/*.tar``, and ``classes.txt`` with one
class name per line (line ``i`` names class ``i``; blank lines and ``#`` comments are skipped), or the file
``data.class_names_file`` names. A split's shards may be named by a pattern instead of a folder:
``data.shards.<split>='wds:train-{0000..0099}.tar'`` (relative to ``data.root``; see :mod:`pand.data.tar_shards`
for patterns, the index and damaged shards). A shard holds samples as img2dataset and webdataset's ``TarWriter``
write them: ``<key>.jpg`` (or ``jpeg``, ``png``, ``webp``) and ``<key>.cls``, the 0-based class index as decimal text.
A sample without ``cls``, or whose ``cls`` is not an integer in ``0..n-1``, is refused, naming it.

When the dataset has a val split (``data.shards.val``, or a ``val/`` folder) it is the validation split; otherwise
val is carved from train (seeded, stratified), as for ``data=imagefolder``. ``data.skip_bad=true`` keeps the complete
samples of truncated shards and leaves out the samples whose image does not decode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pand.data import base
from pand.data.registry import register_dataset
from pand.data.tar_shards import ShardDataset, ShardSamples, expand_braces, is_shard_pattern, read_shards
from pand.errors import ConfigError, PandError

NAME = "shards"
TITLE = "a WebDataset shards dataset"
SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.txt"

LAYOUT = """\
  <root>/
    train/00000.tar, train/00001.tar, ...  (or data.shards.train='wds:<pattern>', relative to <root>)
    test/00000.tar, ...                    (or data.shards.test=...)
    val/00000.tar, ...                     (optional, or data.shards.val=...; else val is carved from train)
    classes.txt                            one class name per line, line i naming class i (or data.class_names_file)
  each sample of a shard: <key>.jpg (or .jpeg .png .webp) and <key>.cls (its class index, 0-based)"""


def _pattern(root: Path, split: str, shards: Mapping[str, Any] | None) -> str | None:
    """The pattern of ``split``'s shards: the configured one, else the split's folder if it exists, else None."""
    given = (shards or {}).get(split)
    if given not in (None, ""):
        return str(given)
    folder = root / split
    return str(folder) if folder.is_dir() else None


def has_official_val(root: str | os.PathLike, shards: Mapping[str, Any] | None = None) -> bool:
    return _pattern(Path(root).expanduser(), "val", shards) is not None


def read_classes(path: Path) -> list[str]:
    """The class names of ``path``, one per line in label order."""
    names = [line for _, line in base.read_lines(path)]
    if not names:
        raise PandError(f"{path} names no class; expected one class name per line, line i naming class i")
    return names


def _labels(samples: ShardSamples, classes: list[str], names_file: Path, setting: str) -> list[int]:
    """The class index of every sample, from its ``cls`` member; refused, naming the first sample, when one has none
    or one outside the classes."""
    n = len(classes)
    labels, bad = [], []
    for i, text in enumerate(samples.cls):
        if text is None:
            bad.append(f"sample {samples.describe(i)} has no .cls member (its class index)")
            continue
        try:
            label = int(text)
        except ValueError:
            bad.append(f"the .cls of sample {samples.describe(i)} is {text!r}, not an integer class index")
            continue
        if not 0 <= label < n:
            bad.append(f"the .cls of sample {samples.describe(i)} is {label}, outside 0..{n - 1} ({n} classes in "
                       f"{names_file})")
        labels.append(label)
    if bad:
        more = f" ({len(bad) - 1} more sample{'s' if len(bad) > 2 else ''} like it)" if len(bad) > 1 else ""
        raise PandError(f"{setting}: {bad[0]}{more}; every sample of data=shards needs a .cls member holding its "
                        f"class index, 0..{n - 1}")
    return labels


def setting_errors(data: Mapping[str, Any]) -> list[str]:
    """What is wrong with the shard settings of a run (``data.shards``, ``data.skip_bad``), checked with the rest of
    its config before anything loads (:mod:`pand.engine.config_checks`)."""
    errors = []
    unlabelled = data.get("unlabelled")
    # a captions dataset may be stored as tar shards (img2dataset's webdataset output): only reading it tells
    may_be_shards = data.get("name") in (NAME, "captions") or is_shard_pattern(unlabelled) or \
        (isinstance(unlabelled, str) and unlabelled.startswith("captions:"))
    if data.get("skip_bad") is True and not may_be_shards:
        errors.append("data.skip_bad=true is set, but no image of this run comes from tar shards (data=shards, "
                      "data.unlabelled='wds:...' or captions in shards), and it concerns only those; remove it")
    if data.get("name") != NAME:
        return errors
    shards = data.get("shards")
    if shards is None:
        return errors
    if not isinstance(shards, Mapping):
        return errors + [f"data.shards={shards!r} is not allowed: expected a mapping {{train: ..., val: null, "
                         "test: ...}} of shard patterns"]
    unknown = sorted(set(shards) - set(SPLITS))
    if unknown:
        errors.append(f"data.shards has unknown split(s) {unknown}; the splits are {', '.join(SPLITS)}")
    for split, pattern in shards.items():
        if pattern in (None, ""):
            continue
        if not isinstance(pattern, str):
            errors.append(f"data.shards.{split}={pattern!r} is not allowed: expected a shard pattern such as "
                          f"'wds:{split}/{{00000..00009}}.tar', or null for the folder <root>/{split}/")
            continue
        try:
            expand_braces(pattern)
        except ConfigError as err:
            errors.append(f"data.shards.{split}: {err}")
    return errors


@register_dataset(NAME)
def load(root: str | os.PathLike, split: str, *, download: bool = False,
         class_names_file: str | os.PathLike | None = None, shards: Mapping[str, Any] | None = None,
         skip_bad: bool = False) -> ShardDataset:
    """The ``"train"``, ``"test"`` or (when the dataset has one) ``"val"`` split."""
    base.check_split(split, SPLITS)
    if download:
        raise ConfigError("shard datasets cannot be downloaded; set download=False and put the shards in place:\n"
                          + LAYOUT)
    errors = setting_errors({"name": NAME, "shards": shards})
    if errors:
        raise ConfigError(errors[0])
    root = Path(root).expanduser()
    pattern = _pattern(root, split, shards)
    if pattern is None:
        raise base.not_found(f"the {split} shards of the shards dataset are not found (no data.shards.{split} "
                             "pattern, no folder)", root / split, TITLE, LAYOUT, download=False)
    names_file = Path(class_names_file).expanduser() if class_names_file is not None else root / CLASSES_FILE
    if not names_file.is_file():
        raise base.not_found("the class names of the shards dataset are missing", names_file, TITLE, LAYOUT,
                             download=False)
    classes = read_classes(names_file)
    setting = f"data.shards.{split}"
    samples = read_shards(pattern, setting=setting, skip_bad=skip_bad, relative_to=root)
    return ShardDataset(NAME, split, classes, samples, _labels(samples, classes, names_file, setting))
