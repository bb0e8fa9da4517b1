"""Image-caption pairs without classes: COCO captions, a JSONL / CSV file of (image, text) pairs, or img2dataset shards.

Three layouts under ``root``, chosen by ``format`` (``data.format``; ``auto`` detects it and refuses a folder that
looks like two of them):

* ``coco``: the official captions files, ``annotations/captions_train2017.json`` (``images`` [{id, file_name, ...}],
  ``annotations`` [{image_id, id, caption}]) with the images in ``train2017/``; the test split is
  ``captions_val2017.json`` with ``val2017/`` (COCO publishes no test captions, and the 2017 val images are what
  papers and clip_benchmark report retrieval on). Any split's file is ``split_paths.<split>`` and its image folder
  ``image_dirs.<split>`` (default: the ``XXX`` of ``captions_XXX.json``), so Karpathy's split or COCO 2014 need no
  code.
* ``pairs``: ``train.jsonl`` (one ``{"image": ..., "text": ...}`` object per line; ``text`` may be a list of
  captions) or ``train.csv`` / ``train.tsv`` (a header row; the separator is a tab when the header holds one, else a
  comma, or ``csv_separator``), and ``test.*`` (``val.*`` optional). The keys are ``image_key`` / ``text_key``; unset,
  ``image`` / ``text``, else open_clip's CSV defaults ``filepath`` / ``title`` (``--csv-img-key``,
  ``--csv-caption-key``). Image paths are relative to the file's folder (or absolute), inside ``root``; an image on
  several rows has several captions.
* ``img2dataset``: shard folders ``<split>/00000/000000001.jpg`` + ``000000001.txt`` (the caption; the ``.json`` beside
  them is not read), for ``train/`` and ``test/`` (``val/`` optional); or img2dataset's WebDataset output, tar shards
  ``<split>/00000.tar`` holding the same members, read by index (:mod:`pand.data.tar_shards`; a split's shards may
  also be a pattern, ``split_paths.<split>='wds:<pattern>'``, and ``skip_bad`` applies to them).

An image has one or more captions (COCO about 5). There is no class: every item's label is
:data:`~pand.data.unlabelled.UNLABELLED`. A caption without its image (an annotation of an unknown image id, a row or a
``.txt`` whose image file is missing) and an image without a caption are refused, counted, with the first few named;
``incomplete=skip`` leaves them out instead, with one warning line that counts them.

A run on such a dataset (``data=captions``) is assembled here, by :func:`run_splits`, not from class labels: the
training images are the run's unlabelled pool (no labelled image: the teacher's terms and the captions train the
student); ``val`` (the official val split when one is configured, else a seeded ``val_fraction`` of the training
images) is scored by matching each val image with its own caption among one caption per val image, so ``val/acc1``
is image -> text recall@1 on val and the run's "classes" are those val captions, used for model selection only; the
test split keeps its captions for the report's two-way retrieval and has no class to score.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pand.data import base
from pand.data.base import ClassificationDataset, SubsetDataset, subset
from pand.data.registry import register_dataset
from pand.data.splits import stratified_split
from pand.data.tar_shards import ShardDataset, ShardSamples, is_shard_pattern, read_shards
from pand.data.unlabelled import UNLABELLED, TrainingPool
from pand.data.walk import check_input_root, listed, walk
from pand.errors import ConfigError, DatasetNotFoundError, PandError

log = logging.getLogger("pand")

NAME = "captions"
TITLE = "a captions dataset"
FORMATS = ("coco", "pairs", "img2dataset")
SPLITS = ("train", "val", "test")
PAIR_SUFFIXES = (".jsonl", ".csv", ".tsv")
#: open_clip's CSV column defaults (``--csv-img-key`` / ``--csv-caption-key``), accepted when pand's are absent.
IMAGE_KEYS = ("image", "filepath")
TEXT_KEYS = ("text", "title")
INCOMPLETE = ("error", "skip")

LAYOUT = """\
  data.format=coco (COCO captions; every file and folder configurable):
    <root>/annotations/captions_train2017.json   {"images": [{"id", "file_name", ...}],
                                                  "annotations": [{"image_id", "id", "caption"}]}
    <root>/annotations/captions_val2017.json     the test split (COCO publishes no test captions)
    <root>/train2017/*.jpg, <root>/val2017/*.jpg
  data.format=pairs (one (image, text) pair per line or row; an image on several rows has several captions):
    <root>/train.jsonl   {"image": "images/0001.jpg", "text": "a dog on a beach"} per line, or train.csv /
                         train.tsv with a header row (image,text or open_clip's filepath,title columns)
    <root>/test.jsonl    (val.jsonl optional); image paths relative to the file's folder, inside <root>
  data.format=img2dataset (shard folders of <key>.jpg + <key>.txt caption, <key>.json not read):
    <root>/train/00000/000000001.jpg, <root>/train/00000/000000001.txt, <root>/train/00001/...
    <root>/test/00000/...         (val/ optional)
    or tar shards of the same members: <root>/train/00000.tar, ... (or data.split_paths.train='wds:<pattern>')
  Without a val split (data.split_paths.val, val.jsonl, val/), val is a seeded data.val_fraction of train."""


class CaptionDataset(base.FileDataset):
    """Images on disk with their captions (``captions[i]``: the texts of image ``i``) and no class."""

    def __init__(self, split: str, root: str | os.PathLike, relpaths: Sequence[str],
                 captions: Sequence[Sequence[str]], source: str | os.PathLike) -> None:
        super().__init__(NAME, split, [], root, relpaths, [UNLABELLED] * len(relpaths))
        if len(captions) != len(relpaths):
            raise ValueError(f"{len(relpaths)} images but {len(captions)} caption lists")
        self.captions = [tuple(c) for c in captions]
        self.source = Path(source)  # the file or folder the split was read from, for messages

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        # The captions are part of the content: a run, or a teacher cache of caption embeddings, made with other
        # captions must not pass for this one.
        super()._hash_items(h, indices)
        for i in indices:
            h.update(json.dumps(self.captions[i], ensure_ascii=False).encode("utf-8"))


class ShardCaptionDataset(ShardDataset):
    """Samples of tar shards with their captions (``captions[i]``: the texts of sample ``i``) and no class."""

    def __init__(self, split: str, samples: ShardSamples, captions: Sequence[Sequence[str]], source: str) -> None:
        super().__init__(NAME, split, [], samples, [UNLABELLED] * len(samples))
        if len(captions) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(captions)} caption lists")
        self.captions = [tuple(c) for c in captions]
        self.source = source  # the pattern or folder the split was read from, for messages

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        super()._hash_items(h, indices)  # as CaptionDataset: the captions are part of the content
        for i in indices:
            h.update(json.dumps(self.captions[i], ensure_ascii=False).encode("utf-8"))


def captions_of(dataset: ClassificationDataset) -> list[tuple[str, ...]] | None:
    """The captions of every item of ``dataset`` (``()`` for an item without any), or None when it has none at all.

    Sees through subsets (val carved from train, hidden labels), a training pool (labelled images, then unlabelled
    ones) and wrappers that read the same items' pixels from elsewhere (the decoded-image cache keeps the dataset it
    wraps as ``dataset``)."""
    if isinstance(dataset, (CaptionDataset, ShardCaptionDataset)):
        return list(dataset.captions)
    if isinstance(dataset, SubsetDataset):
        parent = captions_of(dataset.parent)
        return None if parent is None else [parent[i] for i in dataset.indices]
    if isinstance(dataset, TrainingPool):
        first, second = captions_of(dataset.labelled), captions_of(dataset.unlabelled)
        if first is None and second is None:
            return None
        return (first or [()] * dataset.n_labelled) + (second or [()] * dataset.n_unlabelled)
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, ClassificationDataset) and len(inner) == len(dataset):
        return captions_of(inner)
    return None


def has_class_labels(dataset: ClassificationDataset) -> bool:
    """Whether any item carries a class label (a captions test split has none: it is scored by retrieval)."""
    return any(t != UNLABELLED for t in dataset.targets)


# -- the captions training uses ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionTable:
    """The captions of a run's training items: every distinct text once (``texts``, first-seen order) and, per item
    of the training pool, the rows of its captions in ``texts`` (``ids``; empty for an image without any).

    One row per distinct text, so two images captioned alike share a row: a contrastive loss over rows never makes
    them each other's negatives."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, per_item: Sequence[Sequence[str]] | None) -> CaptionTable | None:
        if per_item is None or not any(per_item):
            return None
        row: dict[str, int] = {}
        ids = tuple(tuple(row.setdefault(t, len(row)) for t in texts) for texts in per_item)
        return cls(tuple(row), ids)

    def digest(self) -> str:
        """sha256 of the texts and of which item has which: what a teacher cache of their embeddings is made for."""
        h = hashlib.sha256()
        h.update(json.dumps([self.texts, self.ids], ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()

    def choose(self, seed: int, epoch: int, index: int) -> int:
        """The row of the caption item ``index`` is trained with in ``epoch`` (-1: it has none): seeded by (seed,
        epoch, index) alone, so a resumed run picks exactly what the uninterrupted one would have."""
        ids = self.ids[index]
        if not ids:
            return -1
        digest = hashlib.blake2b(f"caption|{seed}|{epoch}|{index}".encode(), digest_size=8).digest()
        return ids[int.from_bytes(digest, "little") % len(ids)]


# -- reading the three layouts ----------------------------------------------------------------------------------------
class _Read(NamedTuple):
    relpaths: list[str]
    captions: list[list[str]]
    #: what could not be paired: {"captions without image": [...], "images without caption": [...]}
    unpaired: dict[str, list[str]]


def _inside(root: Path, path: Path, what: str, source: Path) -> str:
    """``path`` as a POSIX path relative to ``root``; refused when it leaves ``root``."""
    root_abs = os.path.abspath(root)
    rel = os.path.relpath(os.path.abspath(path), root_abs)
    rel = posixpath.normpath(rel.replace(os.sep, "/"))
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise PandError(f"{source}: {what} {path} lies outside the dataset folder {root}; pand reads a dataset's "
                        "images from inside its folder only (copy them in, or give data.root a folder holding both)")
    return rel


def _read_coco(root: Path, annotations: Path, image_dir: Path) -> _Read:
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise PandError(f"{annotations} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected "
                        "COCO captions: {\"images\": [...], \"annotations\": [...]}") from None
    except UnicodeDecodeError as e:
        raise PandError(f"{annotations} is not UTF-8 text ({e}); expected a COCO captions JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("annotations"), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise PandError(f"{annotations} is not a COCO captions file: expected an object with the lists 'images' "
                        f"[{{id, file_name}}] and 'annotations' [{{image_id, id, caption}}], found {found}")
    folder = _inside(root, image_dir, "the image folder", annotations)
    files: dict[Any, str] = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise PandError(f"{annotations}: images[{k}] = {_short(im)} lacks 'id' or 'file_name'")
        if im["id"] in files:
            raise PandError(f"{annotations}: images[{k}] repeats image id {im['id']!r}")
        files[im["id"]] = posixpath.normpath(f"{folder}/{im['file_name']}") if folder != "." else im["file_name"]
    texts: dict[Any, list[str]] = {}
    orphans: list[str] = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise PandError(f"{annotations}: annotations[{k}] = {_short(ann)} lacks 'image_id' or a 'caption' string")
        text = " ".join(ann["caption"].split())
        if ann["image_id"] not in files:
            orphans.append(f"annotations[{k}] (image id {ann['image_id']!r}, not in 'images')")
        elif text:
            texts.setdefault(ann["image_id"], []).append(text)
    relpaths, captions, bare = [], [], []
    for image_id, rel in files.items():  # the file's order
        if image_id in texts:
            relpaths.append(rel)
            captions.append(texts[image_id])
        else:
            bare.append(str(root / rel))
    return _Read(relpaths, captions, {"captions without image": orphans, "images without caption": bare})


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _pick_key(given: str | None, defaults: Sequence[str], found: Sequence[str], what: str, path: Path) -> str:
    if given:
        if given not in found:
            raise PandError(f"{path} has no {what} column {given!r} (data.{what}_key); it has {list(found)}")
        return given
    for key in defaults:
        if key in found:
            return key
    raise PandError(f"{path} has none of the {what} columns {' or '.join(map(repr, defaults))}; it has {list(found)}. "
                    f"Name yours with data.{what}_key=...")


def _pair_rows(path: Path, image_key: str | None, text_key: str | None,
               separator: str | None) -> Iterable[tuple[int, str, list[str]]]:
    """(line number, image path as written, captions) of every row of a pairs file."""
    if path.suffix.lower() == ".jsonl":
        keys: tuple[str, str] | None = None
        for no, line in base.read_lines(path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise base.malformed(path, no, line, 'a JSON object such as {"image": "a.jpg", "text": "a caption"}')
            if keys is None:
                keys = (_pick_key(image_key, IMAGE_KEYS, list(row), "image", path),
                        _pick_key(text_key, TEXT_KEYS, list(row), "text", path))
            image, text = row.get(keys[0]), row.get(keys[1])
            texts = text if isinstance(text, list) else [text]
            if not isinstance(image, str) or not image or not all(isinstance(t, str) for t in texts):
                raise base.malformed(path, no, line, f'a non-empty "{keys[0]}" path and a "{keys[1]}" string (or a '
                                                     "list of strings)")
            yield no, image, texts
        return
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline()
        sep = separator or ("\t" if "\t" in header or path.suffix.lower() == ".tsv" else ",")
        f.seek(0)
        reader = csv.reader(f, delimiter=sep)
        columns = next(reader, None)
        if not columns:
            raise PandError(f"{path} is empty; expected a header row (image{sep}text) and one row per pair")
        columns = [c.strip() for c in columns]
        at = (columns.index(_pick_key(image_key, IMAGE_KEYS, columns, "image", path)),
              columns.index(_pick_key(text_key, TEXT_KEYS, columns, "text", path)))
        for row in reader:
            no = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns) or not row[at[0]].strip():
                raise base.malformed(path, no, sep.join(row), f"{len(columns)} {sep!r}-separated fields "
                                                              f"({', '.join(columns)}) with an image path")
            yield no, row[at[0]].strip(), [row[at[1]]]


def _read_pairs(root: Path, path: Path, image_key: str | None, text_key: str | None,
                separator: str | None) -> _Read:
    order: dict[str, list[str]] = {}
    missing: list[str] = []
    seen_missing: set[str] = set()
    for no, image, texts in _pair_rows(path, image_key, text_key, separator):
        full = Path(image) if os.path.isabs(image) else path.parent / image
        rel = _inside(root, full, f"line {no}: image", path)
        if not os.path.isfile(root / rel):
            if rel not in seen_missing:
                seen_missing.add(rel)
                missing.append(f"line {no} of {path}: {root / rel}")
            continue
        captions = order.setdefault(rel, [])
        captions.extend(t for t in (" ".join(t.split()) for t in texts) if t)
    bare = [str(root / rel) for rel, caps in order.items() if not caps]
    kept = [(rel, caps) for rel, caps in order.items() if caps]
    return _Read([r for r, _ in kept], [c for _, c in kept],
                 {"captions without image": missing, "images without caption": bare})


def _read_img2dataset(root: Path, folder: Path) -> _Read:
    if not folder.is_dir():
        raise base.not_found(f"img2dataset folder {folder} not found", folder, TITLE, LAYOUT, download=False)
    listing = walk(folder, within=root, accept=lambda n: base.is_image_file(n) or n.lower().endswith(".txt"),
                   max_depth=1)
    prefix = _inside(root, folder, "the shard folder", folder)
    images: dict[str, str] = {}
    texts: dict[str, Path] = {}
    for rel in listing.files:
        stem, ext = posixpath.splitext(rel)
        if ext.lower() == ".txt":
            texts[stem] = folder / rel
        elif stem in images:
            raise PandError(f"{folder}: two images share the key {stem!r} ({images[stem]} and {rel}); "
                            "img2dataset writes one image per key")
        else:
            images[stem] = rel
    relpaths, captions, bare = [], [], []
    for stem, rel in images.items():
        text = texts.get(stem)
        caption = " ".join(text.read_text(encoding="utf-8", errors="replace").split()) if text is not None else ""
        if caption:
            relpaths.append(rel if prefix == "." else f"{prefix}/{rel}")
            captions.append([caption])
        else:
            bare.append(str(folder / rel) + (" (empty caption)" if text is not None
                                             else f" (no {posixpath.basename(stem)}.txt)"))
    orphans = [str(p) for stem, p in texts.items() if stem not in images]
    if not images and not orphans:
        raise base.not_found(f"no images ({', '.join(base.IMAGE_EXTENSIONS)}) in the shard folders of {folder}",
                             folder / "00000" / "000000001.jpg", TITLE, LAYOUT, download=False)
    return _Read(relpaths, captions, {"captions without image": orphans, "images without caption": bare})


def _is_shard_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of tar shards (img2dataset's ``output_format=webdataset``)."""
    return path.is_dir() and any(p.name.endswith(".tar") and not p.name.startswith(".") for p in path.iterdir())


def _read_shard_captions(root: Path, source: str, split: str, incomplete: str, skip_bad: bool) -> ShardCaptionDataset:
    """The samples of the tar shards ``source`` (a pattern, or a folder of shards) with their ``txt`` captions."""
    samples = read_shards(source, setting=f"the {split} shards of the captions dataset", skip_bad=skip_bad,
                          relative_to=root)
    texts = samples.read_texts()
    captions = [" ".join(t.split()) if t is not None else "" for t in texts]
    bare = [f"{samples.describe(i)} ({'empty caption' if t is not None else 'no .txt'})"
            for i, t in enumerate(texts) if not captions[i]]
    _settle(_Read([], [], {"captions without image": [], "images without caption": bare}), incomplete, Path(source))
    keep = [i for i, c in enumerate(captions) if c]
    if not keep:
        raise base.not_found(f"the {split} split of the captions dataset at {source} has no captioned image",
                             Path(source), TITLE, LAYOUT, download=False)
    return ShardCaptionDataset(split, samples.select(keep), [[captions[i]] for i in keep], source)


_ONE = {"captions without image": "caption without image", "images without caption": "image without caption"}


def _settle(read: _Read, incomplete: str, source: Path) -> _Read:
    """Refuse (``incomplete=error``) or leave out with one counted warning (``skip``) what could not be paired."""
    problems = {kind: items for kind, items in read.unpaired.items() if items}
    if not problems:
        return read
    said = "; ".join(f"{len(items)} {kind if len(items) > 1 else _ONE[kind]} ({listed(items, limit=3)})"
                     for kind, items in problems.items())
    if incomplete == "error":
        raise PandError(f"{source}: {said}. Every image needs a caption and every caption its image; fix the "
                        "files, or set data.incomplete=skip to leave these out (they are counted in a warning)")
    log.warning("%s: left out (data.incomplete=skip): %s", source, said)
    return read


# -- options ----------------------------------------------------------------------------------------------------------
def _paths_option(value: Mapping[str, Any] | None, name: str) -> dict[str, str]:
    errors = _paths_option_errors(value, name)
    if errors:
        raise ConfigError(errors[0])
    return {k: str(v) for k, v in (value or {}).items() if v not in (None, "")}


def _paths_option_errors(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"data.{name}={value!r} is not allowed: expected a mapping such as {{train: ..., val: null, test: ...}}"]
    unknown = sorted(set(value) - set(SPLITS))
    return [f"data.{name} has unknown split(s) {unknown}; the splits are {', '.join(SPLITS)}"] if unknown else []


def _option_errors(format: Any, incomplete: Any, csv_separator: Any) -> list[str]:
    errors = []
    if format not in ("auto", *FORMATS):
        errors.append(f"data.format={format!r} is not allowed: expected auto or one of {', '.join(FORMATS)}")
    if incomplete not in INCOMPLETE:
        errors.append(f"data.incomplete={incomplete!r} is not allowed: expected error (refuse images without caption "
                      "and captions without image) or skip (leave them out, counted in a warning)")
    if csv_separator is not None and len(str(csv_separator)) != 1:
        errors.append(f"data.csv_separator={csv_separator!r} is not allowed: expected one character (a tab or a "
                      "comma), or null to read it from the header row")
    return errors


def _check_options(format: str, incomplete: str, csv_separator: str | None) -> None:
    errors = _option_errors(format, incomplete, csv_separator)
    if errors:
        raise ConfigError(errors[0])


#: Data settings of a class-labelled run that a captions dataset has no use for, and why.
NOT_FOR_CAPTIONS = {
    "samples_per_class": "there are no classes to sample labelled images of: every training image is already "
                         "unlabelled",
    "unlabelled": "every training image of a captions dataset is already in the unlabelled pool",
    "class_split": "there are no classes to split",
    "class_names_file": "there are no classes to name",
    "num_classes": "there are no classes (the val captions stand in for them, for model selection)",
}


def setting_errors(data: Mapping[str, Any]) -> list[str]:
    """Every ``data.*`` setting of a captions run that is refused, with the reason: checked with the rest of a run's
    config before anything loads (:mod:`pand.engine.config_checks`), and again when the splits are assembled."""
    errors = []
    for key, why in NOT_FOR_CAPTIONS.items():
        value = data.get(key)
        if value is not None and str(value).strip().lower() not in ("", "none", "null"):
            errors.append(f"data.{key}={value!r} does not go with data=captions: {why}; remove it")
    errors += _option_errors(data.get("format", "auto"), data.get("incomplete", "error"), data.get("csv_separator"))
    for name in ("split_paths", "image_dirs"):
        errors += _paths_option_errors(data.get(name), name)
    return errors


def detect_format(root: Path, split_paths: Mapping[str, str] | None = None) -> str:
    """The layout under ``root`` (or of the files ``split_paths`` names); refused when none or several match."""
    for given in (split_paths or {}).values():
        if is_shard_pattern(given):
            return "img2dataset"
        path = Path(given).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            return "img2dataset"
        if path.suffix.lower() in PAIR_SUFFIXES:
            return "pairs"
        if path.suffix.lower() == ".json":
            return "coco"
    probes = {
        "coco": (root / "annotations").is_dir() and any((root / "annotations").glob("captions_*.json")),
        "pairs": any((root / f"train{s}").is_file() for s in PAIR_SUFFIXES),
        "img2dataset": (root / "train").is_dir(),
    }
    found = [f for f, hit in probes.items() if hit]
    if not found:
        raise DatasetNotFoundError(
            f"no captions dataset found under {root}: it holds none of annotations/captions_*.json, "
            f"train{'|'.join(PAIR_SUFFIXES)}, train/ (data.format=auto looked for all three layouts)\n"
            + base.layout_message(TITLE, LAYOUT, download=False))
    if len(found) > 1:
        raise ConfigError(f"{root} holds the files of several caption layouts ({', '.join(found)}); choose one with "
                          f"data.format={'|'.join(found)}")
    return found[0]


def _split_source(root: Path, fmt: str, split: str, split_paths: Mapping[str, str]) -> Path | str | None:
    """The file or folder a split is read from, or the ``wds:`` pattern of its shards (None: the layout has no such
    split, only val can lack one)."""
    given = split_paths.get(split)
    if is_shard_pattern(given):
        return given  # read_shards names a missing shard itself
    if given is not None:
        path = Path(given).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.exists():
            raise base.not_found(f"data.split_paths.{split} of the captions dataset does not exist", path, TITLE,
                                 LAYOUT, download=False)
        return path
    if fmt == "coco":
        default = {"train": "annotations/captions_train2017.json", "test": "annotations/captions_val2017.json"}
        candidates = [root / default[split]] if split in default else []
    elif fmt == "pairs":
        candidates = [root / f"{split}{s}" for s in PAIR_SUFFIXES]
    else:
        candidates = [root / split]
    for path in candidates:
        if path.exists():
            return path
    if split == "val":
        return None
    raise base.not_found(f"the {split} split of the {fmt} captions dataset is missing", candidates[0], TITLE, LAYOUT,
                         download=False)


def _coco_image_dir(root: Path, annotations: Path, split: str, image_dirs: Mapping[str, str]) -> Path:
    given = image_dirs.get(split)
    if given is not None:
        path = Path(given).expanduser()
        path = path if path.is_absolute() else root / path
    else:
        m = re.fullmatch(r"captions_(.+)\.json", annotations.name)
        if m is None:
            raise ConfigError(f"cannot tell the image folder of {annotations} (not named captions_<folder>.json); "
                              f"set data.image_dirs.{split}=<folder under {root}>")
        path = root / m.group(1)
    if not path.is_dir():
        raise base.not_found(f"the image folder of {annotations} is missing", path, TITLE, LAYOUT, download=False)
    return path


def _resolve(root: str | os.PathLike, format: str, split_paths: Mapping[str, Any] | None) -> tuple[Path, str, dict]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise base.not_found(f"captions dataset folder {root} does not exist", root, TITLE, LAYOUT, download=False)
    paths = _paths_option(split_paths, "split_paths")
    return root, (detect_format(root, paths) if format == "auto" else format), paths


def has_official_val(root: str | os.PathLike, format: str = "auto",
                     split_paths: Mapping[str, Any] | None = None) -> bool:
    """Whether the captions under ``root`` have their own val split (else val is carved from train)."""
    root, fmt, paths = _resolve(root, format, split_paths)
    return _split_source(root, fmt, "val", paths) is not None


@register_dataset(NAME)
def load(root: str | os.PathLike, split: str, *, download: bool = False, format: str = "auto",
         split_paths: Mapping[str, Any] | None = None, image_dirs: Mapping[str, Any] | None = None,
         image_key: str | None = None, text_key: str | None = None, csv_separator: str | None = None,
         incomplete: str = "error", skip_bad: bool = False) -> CaptionDataset | ShardCaptionDataset:
    """The ``"train"``, ``"test"`` or (when the layout has one) ``"val"`` split, each image with its captions."""
    base.check_split(split, SPLITS)
    if download:
        raise ConfigError("captions datasets cannot be downloaded; set download=False and put the files in place:\n"
                          + LAYOUT)
    _check_options(format, incomplete, csv_separator)
    check_input_root(root, "data.root")
    root, fmt, paths = _resolve(root, format, split_paths)
    source = _split_source(root, fmt, split, paths)
    if source is None:
        raise ConfigError(f"the captions dataset under {root} has no val split (no val file or folder, nor "
                          "data.split_paths.val); val is carved from train (data.val_fraction)")
    if fmt == "img2dataset" and (isinstance(source, str) or _is_shard_folder(source)):
        return _read_shard_captions(root, str(source), split, incomplete, skip_bad)
    if fmt == "coco":
        read = _read_coco(root, source, _coco_image_dir(root, source, split, _paths_option(image_dirs, "image_dirs")))
    elif fmt == "pairs":
        read = _read_pairs(root, source, image_key, text_key, csv_separator)
    else:
        read = _read_img2dataset(root, source)
    if fmt == "coco":
        absent = [i for i, rel in enumerate(read.relpaths) if not os.path.isfile(root / rel)]
        if absent:
            gone = set(absent)
            read = _Read([r for i, r in enumerate(read.relpaths) if i not in gone],
                         [c for i, c in enumerate(read.captions) if i not in gone],
                         {**read.unpaired, "captions without image": read.unpaired["captions without image"]
                          + [f"{root / read.relpaths[i]} (listed in {source.name}, no such file)" for i in absent]})
    read = _settle(read, incomplete, source)
    if not read.relpaths:
        raise base.not_found(f"the {split} split of the captions dataset at {source} has no captioned image", source,
                             TITLE, LAYOUT, download=False)
    outside = base.files_outside(root, read.relpaths)
    if outside:
        rel, real = outside[0]
        raise PandError(f"{source} lists {root / rel}, which resolves to {real}, outside the dataset folder {root}; "
                        "pand reads a dataset's images from inside its folder only: copy the files in instead of "
                        "linking to them")
    return CaptionDataset(split, root, read.relpaths, read.captions, source)


# -- a run on captions ------------------------------------------------------------------------------------------------
#: The ``data.*`` keys :func:`load` reads, beside ``root``.
OPTIONS = ("format", "split_paths", "image_dirs", "image_key", "text_key", "csv_separator", "incomplete", "skip_bad")


class RunSplits(NamedTuple):
    train: ClassificationDataset  # no labelled image
    val: ClassificationDataset  # each image labelled with its own caption among the val captions
    test: ClassificationDataset  # captions kept, no class
    unlabelled: ClassificationDataset  # every training image


def with_vocabulary(dataset: ClassificationDataset, classes: Sequence[str], targets: Sequence[int],
                    split: str | None = None) -> SubsetDataset:
    """``dataset`` (its items and captions unchanged) as a split of a run whose classes are ``classes``."""
    view = SubsetDataset(dataset, range(len(dataset)), split=split or dataset.split)
    view.classes, view.targets = list(classes), [int(t) for t in targets]
    return view


def selection_vocabulary(captions: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """One caption per val image (its first one no earlier image took), and each image's row among them.

    Distinct texts, so no two classes are the same sentence; an image whose every caption another image took
    shares that image's row."""
    vocabulary: dict[str, int] = {}
    rows = []
    for texts in captions:
        free = next((t for t in texts if t not in vocabulary), None)
        rows.append(vocabulary.setdefault(free, len(vocabulary)) if free is not None else vocabulary[texts[0]])
    return list(vocabulary), rows


def run_splits(data: Mapping[str, Any]) -> RunSplits:
    """The splits of a run on a captions dataset (``data=captions``); see the module docstring."""
    errors = setting_errors(data)
    if errors:
        raise ConfigError("; ".join(errors))
    options = {k: data[k] for k in OPTIONS if k in data}
    root = data["root"]
    full = load(root, "train", download=bool(data.get("download", False)), **options)
    test = load(root, "test", **options)
    if has_official_val(root, options.get("format", "auto"), options.get("split_paths")):
        val, pool = load(root, "val", **options), full
    else:
        kept, held = stratified_split([0] * len(full), float(data["val_fraction"]), int(data.get("split_seed", 0)))
        if not held:
            raise ConfigError(f"data.val_fraction={data['val_fraction']} of {len(full)} training images leaves no "
                              "validation images")
        val, pool = subset(full, held, split="val"), subset(full, kept)
    vocabulary, rows = selection_vocabulary(captions_of(val))
    if len(vocabulary) < 2:
        raise ConfigError(f"the val split of the captions dataset under {root} has {len(val)} image(s) with "
                          f"{len(vocabulary)} distinct caption(s); model selection matches each val image with its "
                          "caption among the others and needs at least 2 (raise data.val_fraction, or add images)")
    return RunSplits(
        train=with_vocabulary(subset(full, [], split="train"), vocabulary, []),
        val=with_vocabulary(val, vocabulary, rows, split="val"),
        test=with_vocabulary(test, vocabulary, [UNLABELLED] * len(test)),
        unlabelled=with_vocabulary(pool, vocabulary, [UNLABELLED] * len(pool), split="unlabelled"),
    )
