"""Images in WebDataset tar shards (as img2dataset writes them), read by index: ``wds:<pattern>``.

pand addresses every training image by its index (the sampler's seeded order, the teacher cache's rows, an exact
resume), so shards are not streamed as WebDataset streams them: each shard is indexed once and its images are read
at their offsets.

Pattern. ``wds:/data/{00000..00099}.tar`` names the shards with brace expansion as webdataset (braceexpand) does:
numeric ranges keep their zero padding (``{00000..00099}``, ``{0..10..2}``), ``{a,b}`` lists alternatives, braces may
be nested or repeated, and ``::`` joins several patterns. A pattern that names one folder means every ``.tar`` file
in it, sorted. Relative paths are relative to the working folder (``data.unlabelled``) or to ``data.root``
(``data=shards``).

Samples. As WebDataset groups them: consecutive members sharing a key (the member's path up to the first dot of its
base name) form one sample, and the rest of the name is the extension (lower-cased). A sample needs an image (``jpg``,
``jpeg``, ``png`` or ``webp``; the first of these if it has several); ``cls`` (an integer label, read by
``data=shards``), ``txt`` (a caption) and ``json`` are optional, other members are ignored. A sample without an image
is left out and counted in one warning line; a key whose members are not consecutive, or a sample with two members of
one extension, is refused (WebDataset would make two samples of it, or fail). A sample is named
``<shard>:<key>.<ext>`` in messages, and its sample id is ``<shard name>/<key>`` (the shard's path relative to the
folder holding all shards).

Index. A shard is scanned once with :mod:`tarfile` (headers only; the small ``cls`` members are read) into a record
of every sample's key, image offset and size, label text and caption offset, which is written atomically as JSON
beside the shard (``<shard>.pand-index.json``) or, when that folder is not writable, under
``$PAND_CACHE_DIR/shard-index/`` (default ``~/.cache/pand/shard-index/``), named by a hash of the shard's real path.
The record holds the shard's size and modification time (ns) and is rebuilt when either changes. An image is read
with one ``pread`` at its offset (a file descriptor per shard and process, re-opened after a fork, at most
:data:`MAX_OPEN` open) and decoded like an image file (:func:`pand.data.base.decode_rgb`).

Damage. A shard that is missing, truncated (a member's data or a header runs past the end, or the end-of-archive
blocks are missing) or damaged (an invalid header) is refused, naming the shard and how many complete samples it
holds; an image that does not decode is a :class:`~pand.errors.CorruptImageError` naming ``<shard>:<key>.<ext>``
when training reads it, or before training when ``data.verify_images`` decodes every image. With
``data.skip_bad=true`` a truncated shard keeps its complete samples (the last sample before the cut is dropped, as
it may lack members) and samples whose image does not decode are left out; so that no index ever shifts between
runs, the index build then decodes every image once and records which ones fail, before any index is assigned, and
every run reads the same list. What was left out is counted in one warning line and kept in the index record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pand.data.base import ClassificationDataset, decode_reason, decode_rgb, user_cache_dir
from pand.data.walk import check_input_root, listed
from pand.errors import ConfigError, CorruptImageError, DatasetNotFoundError, PandError
from pand.io import atomic_write_text, mark_output_folder, read_json

__all__ = [
    "IMAGE_MEMBERS", "LAYOUT", "WDS_PREFIX", "ShardDataset", "ShardIndex", "ShardMember", "ShardSamples",
    "decode_error", "expand_braces", "index_locations", "is_shard_pattern", "load_index", "read_shards", "shard_paths",
    "split_key",
]  # fmt: skip

log = logging.getLogger("pand")

#: The prefix that marks a setting's value as a shard pattern.
WDS_PREFIX = "wds:"
#: Image members, in the order one is chosen when a sample has several.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".pand-index.json"
INDEX_KIND = "pand.shard-index"
INDEX_VERSION = 1
INDEX_SUBDIR = "shard-index"
#: File descriptors a process keeps open (a run may read thousands of shards; the usual limit is 1024 per process).
MAX_OPEN = 64
#: Decoding is mostly C code that releases the GIL: a few threads decode a shard's images for ``skip_bad``.
MAX_WORKERS = 8
#: A ``cls`` member longer than this is not a class index; its first bytes are kept for the message.
CLS_MAX_BYTES = 64
_BLOCK = tarfile.BLOCKSIZE
# What was left out, already said in this process.
_warned: set[str] = set()

LAYOUT = (
    "WebDataset tar shards as img2dataset writes them, named by a brace pattern such as "
    "wds:/data/shards/{00000..00099}.tar (or wds:/data/shards/ for every .tar in that folder), each sample a run of "
    "members sharing a key: <key>.jpg (or .jpeg .png .webp, required), <key>.cls (the class index, for data=shards), "
    "<key>.txt and <key>.json (optional)"
)


def is_shard_pattern(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(WDS_PREFIX)


# -- patterns ---------------------------------------------------------------------------------------------------------
_INT_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")
_CHAR_RANGE = re.compile(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def expand_braces(pattern: str) -> list[str]:
    """Every name ``pattern`` stands for, in order, as braceexpand (and so webdataset) expands it.

    ``{a,b}`` gives each alternative, ``{00..10}`` a numeric range zero-padded to the wider end when either end has a
    leading zero, ``{1..9..2}`` a range with a step, ``{a..e}`` a range of letters; groups may be nested and repeated
    (the product, leftmost varying slowest). A group that is none of these (``{abc}``) stays as written.

    Raises:
        ConfigError: a brace that is never closed, or a closing brace without its opening one.
    """
    depth = 0
    for pos, ch in enumerate(pattern):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            raise ConfigError(f"unbalanced braces in {pattern!r}: the }} at position {pos} closes nothing")
    if depth:
        raise ConfigError(f"unbalanced braces in {pattern!r}: {depth} {{ never closed")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    start = pattern.find("{")
    while start != -1:
        end = _closing(pattern, start)
        options = _alternatives(pattern[start + 1:end])
        if options is not None:
            head, tails = pattern[:start], _expand(pattern[end + 1:])
            return [head + middle + tail for option in options for middle in _expand(option) for tail in tails]
        start = pattern.find("{", start + 1)  # a literal group: look inside and after it
    return [pattern]


def _closing(pattern: str, start: int) -> int:
    depth = 0
    for pos in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[pos], 0)
        if depth == 0:
            return pos
    raise AssertionError("balanced braces were checked before")


def _alternatives(body: str) -> list[str] | None:
    parts, depth, last = [], 0, 0
    for pos, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[last:pos])
            last = pos + 1
    if parts:
        return [*parts, body[last:]]
    m = _INT_RANGE.fullmatch(body)
    if m:
        first, last_, step = m.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last_))
        width = max(len(first), len(last_)) if padded else 0
        return [f"{v:0{width}d}" for v in _steps(int(first), int(last_), step)]
    m = _CHAR_RANGE.fullmatch(body)
    if m:
        first, last_, step = m.groups()
        return [chr(v) for v in _steps(ord(first), ord(last_), step)]
    return None


def _steps(first: int, last: int, step: str | None) -> range:
    k = abs(int(step)) if step else 1
    k = k or 1
    return range(first, last + 1, k) if first <= last else range(first, last - 1, -k)


def shard_paths(pattern: str, *, setting: str, relative_to: str | os.PathLike | None = None) -> list[Path]:
    """The shard files ``pattern`` (with or without ``wds:``) names, in order; every one must exist.

    Raises:
        ConfigError: the pattern names no shard, or one shard twice, or has unbalanced braces.
        DatasetNotFoundError: a shard (or the one folder named) does not exist; the message names it, the pattern and
            the expected layout.
    """
    text = pattern[len(WDS_PREFIX):] if pattern.startswith(WDS_PREFIX) else pattern
    names = [name for part in text.split("::") if part.strip() for name in expand_braces(part.strip())]
    if not names:
        raise ConfigError(f"{setting}={pattern!r} names no shard; expected {LAYOUT}")
    base = Path(relative_to).expanduser() if relative_to is not None else None
    paths = []
    for name in names:
        path = Path(name).expanduser()
        paths.append(base / path if base is not None and not path.is_absolute() else path)
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        paths = sorted(p for p in folder.iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
        if not paths:
            raise DatasetNotFoundError(f"{setting}: the folder {folder} (from {pattern}) holds no .tar shard; "
                                       f"expected {LAYOUT}")
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise ConfigError(f"{setting}={pattern} names the shard {path} twice; each shard may be read once")
        seen.add(path)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        how = f"{len(missing)} of the {len(paths)} shards it names are missing: {listed(missing)}" \
            if len(missing) > 1 else f"it names {len(paths)} shard{'s' if len(paths) > 1 else ''}"
        raise DatasetNotFoundError(f"{setting}: shard {missing[0]} does not exist (pattern {pattern}; {how}); "
                                   f"expected {LAYOUT}")
    return paths


# -- the index of one shard -------------------------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """What one shard holds: its samples with an image, in tar order, and what could not be read."""

    path: Path
    size: int
    mtime_ns: int
    keys: list[str]
    image: list[str]  # the extension of each sample's image member
    offset: list[int]  # where the image's bytes start in the shard
    nbytes: list[int]
    cls: list[str | None]  # the text of the ``cls`` member (None: the sample has none)
    txt: list[list[int] | None]  # [offset, size] of the ``txt`` member
    no_image: list[str] = field(default_factory=list)  # keys of samples without an image (left out)
    truncated: dict[str, Any] | None = None  # {"at": byte, "reason": ...}: the samples listed are the complete ones
    checked: bool = False  # every image was decoded (for data.skip_bad)
    bad: dict[int, str] = field(default_factory=dict)  # sample -> why its image does not decode (when checked)

    def record(self) -> dict[str, Any]:
        return {
            "kind": INDEX_KIND, "version": INDEX_VERSION, "shard": self.path.name, "size": self.size,
            "mtime_ns": self.mtime_ns, "keys": self.keys, "image": self.image, "offset": self.offset,
            "nbytes": self.nbytes, "cls": self.cls, "txt": self.txt, "no_image": self.no_image,
            "truncated": self.truncated, "checked": self.checked,
            "bad": [[k, why] for k, why in sorted(self.bad.items())],
            # for a reader of the file: what was left out of this shard, and why
            "counts": {"samples": len(self.keys), "without_image": len(self.no_image),
                       "undecodable": len(self.bad) if self.checked else None},
        }  # fmt: skip

    @classmethod
    def from_record(cls, path: Path, r: dict[str, Any]) -> ShardIndex:
        return cls(path, int(r["size"]), int(r["mtime_ns"]), list(r["keys"]), list(r["image"]), list(r["offset"]),
                   list(r["nbytes"]), list(r["cls"]), list(r["txt"]), list(r["no_image"]), r["truncated"],
                   bool(r["checked"]), {int(k): str(why) for k, why in r["bad"]})

    def member(self, k: int) -> str:
        return f"{self.path}:{self.keys[k]}.{self.image[k]}"


def index_locations(shard: str | os.PathLike) -> tuple[Path, Path | None]:
    """(beside the shard, in the user's cache folder or None): where the index of ``shard`` is looked for, in order."""
    shard = Path(shard)
    beside = shard.with_name(shard.name + INDEX_SUFFIX)
    cache = user_cache_dir()
    if cache is None:
        return beside, None
    digest = hashlib.sha256(os.path.realpath(shard).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return beside, cache / INDEX_SUBDIR / f"{digest}-{shard.name}{INDEX_SUFFIX}"


def load_index(shard: str | os.PathLike, *, decode: bool = False) -> ShardIndex:
    """The index of ``shard``: read from where it was stored when it still fits the shard (same size and modification
    time; decoded when ``decode``), else built by scanning the shard and stored (see the module docstring)."""
    shard = Path(shard)
    try:
        st = os.stat(shard)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"shard {shard} does not exist; expected {LAYOUT}") from e
    beside, cached = index_locations(shard)
    for place in (beside, cached):
        index = _stored(shard, place, st) if place is not None else None
        if index is not None and (index.checked or not decode):
            return index
    index = _scan(shard, decode=decode)
    _store(index, beside, cached)
    return index


def _stored(shard: Path, place: Path, st: os.stat_result) -> ShardIndex | None:
    if not place.is_file():
        return None
    try:
        record = read_json(place, "shard index")
        fits = (record.get("kind") == INDEX_KIND and record.get("version") == INDEX_VERSION
                and record.get("shard") == shard.name and record.get("size") == st.st_size
                and record.get("mtime_ns") == st.st_mtime_ns)
        index = ShardIndex.from_record(shard, record) if fits else None
        columns = (index.keys, index.image, index.offset, index.nbytes, index.cls, index.txt) if index else ()
        if len({len(c) for c in columns}) > 1:
            raise ValueError("its columns differ in length")
        return index
    except (PandError, AttributeError, KeyError, TypeError, ValueError) as e:
        # A damaged index costs one more scan of the shard, never a wrong answer.
        log.debug("ignoring the shard index %s (%s)", place, e)
        return None


def _store(index: ShardIndex, beside: Path, cached: Path | None) -> None:
    # One line: a shard of 10,000 samples gives a few hundred kB, where indented JSON gives ten times the lines.
    text = json.dumps(index.record(), separators=(",", ":")) + "\n"  # ASCII: member names may not be UTF-8
    try:
        atomic_write_text(beside, text)
        return
    except OSError as e:  # a read-only data folder: the user's cache folder is next
        errors = [f"{beside.parent} ({e.strerror or e})"]
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            mark_output_folder(cached.parent, INDEX_SUBDIR)
            atomic_write_text(cached, text)
            return
        except OSError as e:
            errors.append(f"{cached.parent} ({e.strerror or e})")
    # Remembering is an optimisation: a run whose data is fine goes on, and scans the shard again next time.
    log.warning("cannot store the index of shard %s in %s; it will be built again next run", index.path,
                " nor ".join(errors))


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as WebDataset splits it; None for a name without both."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _scan(shard: Path, *, decode: bool) -> ShardIndex:
    """Read the headers of ``shard`` (and its ``cls`` members) into an index; decode every image when ``decode``."""
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    labels: dict[int, str] = {}  # group -> cls text
    keys_seen: set[str] = set()
    truncated: dict[str, Any] | None = None
    with open(shard, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            reason = "the file is empty" if st.st_size == 0 else f"it does not start with a tar header ({e})"
            truncated = {"at": 0, "reason": reason}
        else:
            try:
                for member in tar:
                    if member.offset_data + member.size > st.st_size:
                        truncated = {"at": member.offset, "reason": f"the data of {member.name} runs past the end of "
                                     f"the file ({member.offset_data + member.size} > {st.st_size} bytes)"}
                        break
                    parts = split_key(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key, ext = parts
                    if groups and groups[-1][0] == key:
                        if ext in groups[-1][1]:
                            raise PandError(f"shard {shard}: sample {key} has two {ext} members ({member.name}); "
                                            "each extension may appear once per sample")
                    else:
                        if key in keys_seen:
                            raise PandError(f"shard {shard}: the members of sample {key} are not consecutive "
                                            f"({member.name} comes after other samples); write each sample's "
                                            "members one after the other, as webdataset's TarWriter does")
                        keys_seen.add(key)
                        groups.append((key, {}))
                    groups[-1][1][ext] = (member.offset_data, member.size)
                    if ext == "cls":
                        data = tar.extractfile(member).read(CLS_MAX_BYTES + 1)  # type: ignore[union-attr]
                        labels[len(groups) - 1] = data[:CLS_MAX_BYTES].decode("utf-8", "replace").strip()
                else:
                    f.seek(tar.offset)
                    if f.read(_BLOCK) != bytes(_BLOCK):
                        truncated = {"at": tar.offset, "reason": "the end-of-archive blocks are missing (the file "
                                     "was cut short, or holds something else after its last member)"}
            except tarfile.ReadError as e:
                truncated = {"at": tar.offset, "reason": str(e)}
        now = os.stat(shard)
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise PandError(f"shard {shard} changed while pand was indexing it; run again once it is written")
    if truncated is not None and groups:
        groups.pop()  # the sample at the cut may lack members that came after it
    index = ShardIndex(shard, st.st_size, st.st_mtime_ns, [], [], [], [], [], [], truncated=truncated)
    for g, (key, members) in enumerate(groups):
        ext = next((e for e in IMAGE_MEMBERS if e in members), None)
        if ext is None:
            index.no_image.append(key)
            continue
        index.keys.append(key)
        index.image.append(ext)
        index.offset.append(members[ext][0])
        index.nbytes.append(members[ext][1])
        index.cls.append(labels.get(g) if "cls" in members else None)
        index.txt.append(list(members["txt"]) if "txt" in members else None)
    if decode:
        index.bad = _decode_all(index)
        index.checked = True
    return index


def _decode_all(index: ShardIndex) -> dict[int, str]:
    """Why each image of ``index`` that does not decode fails, the way training decodes it."""
    members = [ShardMember(index.path, index.keys[k], index.image[k], index.offset[k], index.nbytes[k])
               for k in range(len(index.keys))]
    n_workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(members)))
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pand-shard-check") as pool:
        reasons = list(pool.map(decode_error, members))
    return {k: why for k, why in enumerate(reasons) if why is not None}


# -- one image ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class ShardMember:
    """The image member of one sample: where its bytes lie. ``str()`` names it as messages do."""

    shard: Path
    key: str
    ext: str
    offset: int
    nbytes: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}.{self.ext}"

    def read(self) -> bytes:
        """The member's bytes (its own file descriptor: safe from any thread)."""
        try:
            fd = os.open(self.shard, os.O_RDONLY)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"shard {self.shard} does not exist (it held {self})") from e
        try:
            return _read_at(fd, self)
        finally:
            os.close(fd)

    def decode(self) -> Image.Image:
        return decode_rgb(self.read(), str(self))


def decode_error(member: ShardMember) -> str | None:
    """Why ``member`` cannot be decoded the way training decodes it, or None if it can."""
    try:
        member.decode()
    except CorruptImageError as e:
        return decode_reason(e.__cause__ or e)
    return None


def _read_at(fd: int, member: ShardMember) -> bytes:
    data = os.pread(fd, member.nbytes, member.offset)
    if len(data) != member.nbytes:
        raise CorruptImageError(f"cannot read image {member}: the shard ends before its {member.nbytes} bytes; it "
                                "was cut short after pand indexed it: copy it again")
    return data


# -- the samples of a pattern -----------------------------------------------------------------------------------------
@dataclass
class ShardSamples:
    """The samples a pattern reads, in order (shard by shard, tar order within one): what a :class:`ShardDataset`
    is made of."""

    pattern: str
    root: Path  # the folder that holds every shard
    paths: list[Path]
    names: list[str]  # each shard's path relative to ``root`` (POSIX)
    shard: np.ndarray  # int32: the shard of each sample
    keys: list[str]
    exts: list[str]
    offset: np.ndarray  # int64
    nbytes: np.ndarray  # int64
    cls: list[str | None]
    txt: list[list[int] | None]

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, i: int) -> str:
        """``<shard>:<key>``, as messages name a sample."""
        return f"{self.paths[self.shard[i]]}:{self.keys[i]}"

    def read_texts(self) -> list[str | None]:
        """The ``txt`` member of every sample, as text (None: the sample has none); one descriptor per shard."""
        out: list[str | None] = [None] * len(self)
        for s, path in enumerate(self.paths):
            todo = [i for i in np.flatnonzero(self.shard == s).tolist() if self.txt[i] is not None]
            if not todo:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                for i in todo:
                    offset, size = self.txt[i]  # type: ignore[misc]
                    data = _read_at(fd, ShardMember(path, self.keys[i], "txt", offset, size))
                    out[i] = data.decode("utf-8", "replace")
            finally:
                os.close(fd)
        return out

    def select(self, keep: Sequence[int]) -> ShardSamples:
        """The samples ``keep``, in that order."""
        idx = np.asarray(keep, dtype=np.int64)
        return ShardSamples(self.pattern, self.root, self.paths, self.names, self.shard[idx],
                            [self.keys[i] for i in keep], [self.exts[i] for i in keep], self.offset[idx],
                            self.nbytes[idx], [self.cls[i] for i in keep], [self.txt[i] for i in keep])


def read_shards(pattern: str, *, setting: str, skip_bad: bool = False,
                relative_to: str | os.PathLike | None = None) -> ShardSamples:
    """Index every shard of ``pattern`` (built once, see :func:`load_index`) and list their samples.

    Raises:
        DatasetNotFoundError: a shard is missing, or the shards hold no sample with an image.
        PandError: a shard is truncated or damaged (unless ``skip_bad``).
    """
    paths = shard_paths(pattern, setting=setting, relative_to=relative_to)
    for folder in dict.fromkeys(p.parent for p in paths):
        check_input_root(folder, setting)
    root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
    indices = [load_index(p, decode=skip_bad) for p in paths]
    if not skip_bad:
        cut = next((ix for ix in indices if ix.truncated is not None), None)
        if cut is not None:
            n = len(cut.keys)
            raise PandError(
                f"{setting}: shard {cut.path} is truncated or damaged at byte {cut.truncated['at']} of {cut.size} "
                f"({cut.truncated['reason']}); it holds {n} complete sample{'s' if n != 1 else ''}. Copy it again, or "
                "set data.skip_bad=true to keep its complete samples")
    shard_ids, keys, exts, offsets, sizes, cls, txt = [], [], [], [], [], [], []
    for s, ix in enumerate(indices):
        keep = [k for k in range(len(ix.keys)) if not (skip_bad and k in ix.bad)]
        shard_ids.append(np.full(len(keep), s, dtype=np.int32))
        keys += [ix.keys[k] for k in keep]
        exts += [ix.image[k] for k in keep]
        offsets += [ix.offset[k] for k in keep]
        sizes += [ix.nbytes[k] for k in keep]
        cls += [ix.cls[k] for k in keep]
        txt += [ix.txt[k] for k in keep]
    _warn_left_out(indices, setting, skip_bad)
    if not keys:
        raise DatasetNotFoundError(f"{setting}: the {len(paths)} shard{'s' if len(paths) > 1 else ''} of {pattern} "
                                   f"hold no sample with an image ({', '.join(IMAGE_MEMBERS)}); expected {LAYOUT}")
    names = [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]
    return ShardSamples(pattern, root, paths, names, np.concatenate(shard_ids), keys, exts,
                        np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64), cls, txt)


def _warn_left_out(indices: Sequence[ShardIndex], setting: str, skip_bad: bool) -> None:
    """One warning line for everything a pattern's shards leave out (samples without an image; with ``skip_bad`` also
    undecodable images and what a truncated shard lost)."""
    no_image = [f"{ix.path}:{key}" for ix in indices for key in ix.no_image]
    parts, shards = [], set()
    if no_image:
        parts.append(f"{len(no_image)} sample{'s' if len(no_image) > 1 else ''} without an image "
                     f"({', '.join(IMAGE_MEMBERS)}): {listed(no_image, limit=3)}")
        shards.update(ix.path for ix in indices if ix.no_image)
    if skip_bad:
        bad = [f"{ix.member(k)} ({why})" for ix in indices for k, why in sorted(ix.bad.items())]
        if bad:
            parts.append(f"{len(bad)} image{'s' if len(bad) > 1 else ''} that do{'es' if len(bad) == 1 else ''} not "
                         f"decode: {listed(bad, limit=3)}")
            shards.update(ix.path for ix in indices if ix.bad)
        cut = [ix for ix in indices if ix.truncated is not None]
        if cut:
            parts.append(f"the samples after the cut of {len(cut)} truncated shard{'s' if len(cut) > 1 else ''}: "
                         + listed([f"{ix.path} (kept its {len(ix.keys)} complete samples)" for ix in cut], limit=3))
            shards.update(ix.path for ix in cut)
    if parts:
        why = " (data.skip_bad=true)" if skip_bad else ""
        text = f"{setting}: left out{why}, in {len(shards)} of {len(indices)} shards: {'; '.join(parts)}"
        if text not in _warned:  # a run lists a split several times (train, then val carved from it)
            _warned.add(text)
            log.warning("%s", text)


# -- the dataset ------------------------------------------------------------------------------------------------------
class ShardDataset(ClassificationDataset):
    """Samples of tar shards (:class:`ShardSamples`) as a dataset: ``sample_id`` is ``<shard name>/<key>``, and the
    fingerprint covers each sample's shard name, key, image extension and size, and its label."""

    def __init__(self, name: str, split: str, classes: Sequence[str], samples: ShardSamples,
                 targets: Iterable[int], transform: Callable[[Image.Image], Any] | None = None) -> None:
        targets = list(targets)
        if len(targets) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(targets)} targets")
        super().__init__(name, split, classes, targets, transform, samples.root)
        self.pattern = samples.pattern
        self.paths = list(samples.paths)
        self.names = list(samples.names)
        # Per-sample strings are kept in numpy byte arrays, not lists of str: a loader worker that reads a Python
        # object writes its reference count, which copies the object's page into the worker (copy-on-write), so lists
        # of keys grew each worker by about 140 bytes per image it read (benchmarks/scale_shards.py measured it).
        self._shard = samples.shard
        self._keys = np.array([k.encode("utf-8", "surrogateescape") for k in samples.keys], dtype=np.bytes_)
        self._exts = np.array([e.encode("utf-8", "surrogateescape") for e in samples.exts], dtype=np.bytes_)
        self._offset, self._nbytes = samples.offset, samples.nbytes
        self._reset_handles()

    # Each process opens its own descriptors: a forked loader worker must not share its parent's, and a pickled
    # dataset (spawned workers) carries none.
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_pid", "_fds", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def member(self, i: int) -> ShardMember:
        i = self._check_index(i)
        return ShardMember(self.paths[self._shard[i]], self._key(i), self._ext(i), int(self._offset[i]),
                           int(self._nbytes[i]))

    def _key(self, i: int) -> str:
        return self._keys[i].decode("utf-8", "surrogateescape")

    def _ext(self, i: int) -> str:
        return self._exts[i].decode("utf-8", "surrogateescape")

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i``, read with this process's descriptor of its shard."""
        i = self._check_index(i)
        member = self.member(i)
        if self._pid != os.getpid():  # forked: the parent's descriptors and lock are not this process's to use
            for fd in self._fds.values():
                os.close(fd)  # this process's copies; the parent's stay open
            self._reset_handles()
        with self._lock:  # verification reads from threads; the lock keeps a descriptor open while it is read
            return _read_at(self._fd(int(self._shard[i])), member)

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        try:
            fd = os.open(self.paths[s], os.O_RDONLY)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"shard {self.paths[s]} does not exist (it was read from {self.pattern})") \
                from e
        self._fds[s] = fd
        while len(self._fds) > MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def load_image(self, i: int) -> Image.Image:
        return decode_rgb(self.read_bytes(i), str(self.member(i)))

    def sample_id(self, i: int) -> str:
        i = self._check_index(i)
        return f"{self.names[self._shard[i]]}/{self._key(i)}"

    def shard_mtimes(self) -> np.ndarray:
        """int64 modification time (ns) of each sample's shard, read now."""
        try:
            per_shard = np.array([os.stat(p).st_mtime_ns for p in self.paths], dtype=np.int64)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"shard {e.filename} does not exist (it was read from {self.pattern})") from e
        return per_shard[self._shard]

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        for i in indices:
            shard = self.names[self._shard[i]]
            h.update(f"{shard}\0{self._key(i)}.{self._ext(i)}\0{int(self._nbytes[i])}\0{self.targets[i]}\n"
                     .encode("utf-8", "surrogateescape"))
