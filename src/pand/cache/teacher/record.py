"""The format of a teacher cache and its record: what a cache is made of and for, what must agree between a cache and
a run (and how a stored record is checked against it), top-k logit storage, and which cached view an epoch uses."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pand.cache.integrity import CacheDamagedError, read_meta
from pand.cache.teacher.layout import verify_cache
from pand.data import ClassificationDataset
from pand.data.transforms import ReplayableAugment
from pand.errors import ConfigError, MismatchError, PandError
from pand.io import file_digest
from pand.provenance import check_provenance, load_tensors
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, MEMBER_LOGITS

FORMAT_VERSION = 4  # 4: rows in shards (pand.cache.teacher.layout); 3: one pre-allocated array of each kind
# What must agree between a cache and a run for the run to use it.
CHECKED = ("kind", "version", "teacher_spec", "outputs", "logits_topk", "dataset", "split", "fingerprint",
           "transform", "views", "seed", "classes", "templates", "precision", "captions", "storage")
#: The teacher's embeddings of the training images' captions (a cache whose record has ``captions``): float16
#: ``caption_embeds`` [number of distinct captions, D], row r for row r of the run's CaptionTable.
CAPTIONS_FILE = "captions.safetensors"


def encode_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of each row followed by the floor of the rest (``[..., k + 1]``), and their classes.

    The floor is ``log(mean(exp(z_j)))`` over the classes not kept: every one of them gets it back in
    :func:`decode_topk`, so the reconstructed softmax at T=1 keeps the kept classes' probabilities and the left-over
    mass exactly and spreads that mass evenly over the rest.
    """
    z = logits.float()
    num_classes = z.shape[-1]
    if not 0 < k < num_classes:
        raise ValueError(f"top-k storage needs 0 < k < {num_classes} classes, got k={k}")
    top, index = z.topk(k, dim=-1)
    rest = z.scatter(-1, index, float("-inf"))
    floor = torch.logsumexp(rest, dim=-1, keepdim=True) - math.log(num_classes - k)
    return torch.cat([top, floor], dim=-1), index


def decode_topk(values: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float32 ``[..., num_classes]`` logits from :func:`encode_topk`'s values and indices."""
    values = values.float()
    out = values[..., -1:].expand(*values.shape[:-1], int(num_classes)).clone()
    return out.scatter_(-1, index.long(), values[..., :-1])


def choose_view(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the K cached views of ``index`` an epoch uses: seeded, independent across epochs and images."""
    digest = hashlib.blake2b(f"view|{seed}|{epoch}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % views


def logits_topk(setting: int | None, num_classes: int) -> int | None:
    """The k of top-k logit storage for ``cache.topk`` (None: full float16 rows), refused when it keeps every class."""
    if setting is None:
        return None
    k = int(setting)
    if not 0 < k < num_classes:
        raise ConfigError(f"cache.topk={k} is not allowed with {num_classes} classes: expected 1 <= k < "
                          f"{num_classes}, or leave it unset (null) to store every logit in float16")
    return k


def cache_record(
    *, teacher_spec: Mapping[str, Any], dataset: ClassificationDataset, augment: ReplayableAugment, views: int,
    seed: int, templates: Sequence[str] | None, outputs: Sequence[str] = (IMAGE_EMBEDS,), topk: int | None = None,
    precision: str = "fp32", captions: str | None = None, storage: str = "float16",
) -> dict[str, Any]:
    """What a cache is made of and for. ``outputs``: ``["image_embeds"]`` (a CLIP teacher; ``templates`` make its
    class text embeddings) or ``["logits"]`` (a classifier teacher, stored in full or as the ``topk`` largest) or
    ``["member_logits"]`` (a teacher ensemble: each member's logits; ``templates`` when its CLIP members read them).
    ``precision``: of the teacher pass that fills it, recorded only when it is not fp32. ``storage``: of the
    outputs, ``float16`` (exact to ~1e-4 on every loss) or ``int8`` (half the bytes), recorded only when int8. ``captions``: the digest of
    the training images' captions (:meth:`pand.data.captions.CaptionTable.digest`) when the cache also holds their
    text embeddings (a CLIP teacher on image-caption pairs); recorded only then, so every older cache still matches
    a run without captions."""
    outputs = list(outputs)
    if outputs not in ([IMAGE_EMBEDS], [LOGITS], [MEMBER_LOGITS]):
        raise ValueError(f"a teacher cache stores ['{IMAGE_EMBEDS}'], ['{LOGITS}'] or ['{MEMBER_LOGITS}'], not "
                         f"{outputs}")
    record = {
        "kind": "teacher_view_cache",
        "version": FORMAT_VERSION,
        "teacher_spec": dict(teacher_spec),
        "outputs": outputs,
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_samples": len(dataset),
        "transform": augment.describe(),
        "views": int(views),
        "seed": int(seed),
        "classes": list(dataset.classes),
    }
    if outputs == [LOGITS]:
        record["logits_topk"] = logits_topk(topk, len(dataset.classes))
    else:
        record["templates"] = list(templates or [])
    if precision != "fp32":
        record["precision"] = precision
    if storage != "float16":  # recorded only then, like precision: a float16 run must refuse an int8 cache
        record["storage"] = storage
    if captions is not None:
        if outputs != [IMAGE_EMBEDS]:
            raise ValueError("caption embeddings go with a cache of image embeddings (a teacher with a text tower)")
        record["captions"] = captions
    return record


def precision_hint(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """Why a cache of another teacher precision is refused, and what to do; empty when the precisions agree."""
    have, want = stored.get("precision", "fp32"), expected.get("precision", "fp32")
    if have == want:
        return ""
    return (f"The cache was built with cache.precision={have}, this run asks for cache.precision={want}: set "
            f"cache.precision={have} to use it, or rebuild it (cache.rebuild=true).")


def check_version(folder: Path, meta: Mapping[str, Any]) -> None:
    if meta.get("version") != FORMAT_VERSION:
        raise MismatchError(f"{folder} was made for something else and is refused:\n  version: stored "
                            f"{meta.get('version')!r}, expected {FORMAT_VERSION} (the cache format changed)\n"
                            "Rebuild it: set cache.rebuild=true (on the run or `pand cache build ...`), or delete "
                            f"{folder} and run `pand cache build ...`.")


def checked_meta(folder: Path, expected: Mapping[str, Any] | None = None, verify: str = "auto") -> dict[str, Any]:
    """The meta.json of a complete, undamaged cache whose record matches ``expected``; what
    :meth:`TeacherCache.open <pand.cache.teacher.TeacherCache.open>` refuses, and why, is said there."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise PandError(f"no teacher cache at {folder} (missing meta.json); build it with `pand cache build ...`")
    meta = read_meta(folder)
    if not meta.get("complete"):
        raise PandError(
            f"the teacher cache at {folder} is incomplete (a build was interrupted); run `pand cache build` "
            "with the same settings to resume it"
        )
    if expected is not None:
        # precision is compared even when absent from ``expected``: an fp32 run must refuse a bf16 cache
        keys = [k for k in CHECKED if k in expected or k in ("precision", "storage")]
        hint = precision_hint(meta, expected) or \
            "Build a cache for this run with `pand cache build ...` (or cache.rebuild=true)."
        check_provenance(folder, meta, expected, keys=keys, hint=hint)
    check_version(folder, meta)
    verify_cache(folder, meta, verify)
    check_captions_file(folder, meta)
    return meta


def check_captions_file(folder: Path, meta: Mapping[str, Any]) -> None:
    """A cache whose record has ``captions`` holds them in :data:`CAPTIONS_FILE`, whole and unaltered; else
    :class:`CacheDamagedError` naming the file."""
    if meta.get("captions") is None:
        return
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        raise CacheDamagedError(folder, f"{CAPTIONS_FILE} is missing")
    try:
        tensors, _ = load_tensors(path)
    except PandError as err:
        raise CacheDamagedError(folder, f"{CAPTIONS_FILE} cannot be read ({err})") from None
    want = (int(meta.get("num_captions", -1)), int(meta["embed_dim"]))
    found = tensors.get("caption_embeds")
    if found is None or tuple(found.shape) != want:
        got = "no 'caption_embeds'" if found is None else f"caption_embeds {list(found.shape)}"
        raise CacheDamagedError(folder, f"{CAPTIONS_FILE} holds {got}, expected caption_embeds {list(want)}")
    if (meta.get("checksums") or {}).get(CAPTIONS_FILE) != file_digest(path):
        raise CacheDamagedError(folder, f"{CAPTIONS_FILE} does not match its checksum in meta.json")
