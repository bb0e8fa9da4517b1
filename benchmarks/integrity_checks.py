"""What pand's safety checks cost, each measured side by side with the work it protects, in one run.

* image verification before training (every image decoded once) and the content digests that find an image in two
  splits (sha256 of every file) vs one epoch of the training data path on the same images, and their remembered
  re-runs;
* opening the decoded-image cache with its per-chunk digests vs reading one epoch of images from it;
* ``TeacherCache.open`` with its integrity checks (header and size of every shard's arrays, per-row blake2b digests)
  vs reading one epoch of embeddings from the same cache (format 4: rows in shards, written with
  :func:`pand.cache.teacher.layout.write_shard` as a build writes them), and the open time of the same rows in more,
  smaller shards;
* an atomic checkpoint save (temporary file beside the real one, fsync, rename) vs a plain ``torch.save`` of the same
  ResNet-18 training checkpoint (weights + AdamW state), and taking a run folder's lock.

    python benchmarks/integrity_checks.py [--images 600] [--cache-images 6000] [--views 10] [--dim 1024]
                                          [--shard-sizes 128 16] [--decoded-images 5000]
                                          [--sections images teacher-cache decoded-image-cache checkpoint]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pand.bench.loader import make_jpegs
from pand.cache.images import DecodedImageCache
from pand.cache.teacher import FORMAT_VERSION, TeacherCache
from pand.cache.teacher.layout import (
    default_shard_size,
    num_shards,
    row_layout,
    shard_digests_checksum,
    shard_name,
    shard_rows,
    verify_cache,
    write_shard,
)
from pand.data.overlap import item_digests
from pand.data.transforms import AugmentConfig, ReplayableAugment, view_generator
from pand.data.verify import verify_splits
from pand.io import atomic_write_json, atomic_write_with, file_digest
from pand.locks import FolderLock
from pand.provenance import save_tensors


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images(root: Path, n: int) -> list[tuple[str, float, float]]:
    dataset = make_jpegs(root / "jpegs", n, 375, 500)
    augment = ReplayableAugment(AugmentConfig(image_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3))

    def one_epoch() -> None:
        for i in range(len(dataset)):
            augment(dataset.load_image(i), view_generator(0, 0, i))

    memo = root / "memo"
    epoch = _median(one_epoch, 1)
    first = _median(lambda: verify_splits({"train": dataset}, memo_dir=memo, progress=False), 1)
    one_thread = _median(lambda: verify_splits({"train": dataset}, memo_dir=root / "m1", progress=False, workers=1), 1)
    again = _median(lambda: verify_splits({"train": dataset}, memo_dir=memo, progress=False), 5)
    digests = _median(lambda: item_digests(dataset, memo_dir=None), 3)
    digests_first = _median(lambda: item_digests(dataset, memo_dir=root / "digests"), 1)
    digests_again = _median(lambda: item_digests(dataset, memo_dir=root / "digests"), 5)
    return [
        (f"one epoch of the training data path ({n} JPEGs 375x500, decode + augment, 1 process)", epoch, 1.0),
        ("verify every image, first run (thread pool)", first, first / epoch),
        ("verify every image, first run (1 thread)", one_thread, one_thread / epoch),
        ("verify again (remembered by fingerprint)", again, again / epoch),
        ("content digests of every file (sha256, no memo)", digests, digests / epoch),
        ("content digests, first run (and written to the memo)", digests_first, digests_first / epoch),
        ("content digests again (memo: one stat per file)", digests_again, digests_again / epoch),
    ]


def decoded(root: Path, n: int) -> list[tuple[str, float, float]]:
    dataset = make_jpegs(root / "decoded-jpegs", n, 72, 96)
    folder = root / "decoded"
    DecodedImageCache.build(dataset, folder, 64, progress=False)
    cache = DecodedImageCache.open(folder, dataset, 64)

    def one_epoch() -> None:
        for i in range(len(cache)):
            cache.image(i)

    epoch = _median(one_epoch, 3)
    opened = _median(lambda: DecodedImageCache.open(folder, dataset, 64), 3)
    size = (folder / "pixels.u8").stat().st_size / 2**20
    return [
        (f"read one epoch of images from the decoded-image cache ({n} images, short side 64, {size:.0f} MiB)", epoch,
         1.0),
        ("DecodedImageCache.open: every chunk's digest (<= 1 GiB)", opened, opened / epoch),
    ]


def _teacher_cache(folder: Path, n: int, views: int, dim: int, shard_size: int) -> dict:
    """A complete format-4 teacher cache of random rows, written shard by shard as a build writes it; its meta."""
    folder.mkdir()
    classes = [f"class {i}" for i in range(200)]
    save_tensors(folder / "text.safetensors", {"text_embeds": torch.zeros(len(classes), dim)}, {})
    meta = {"version": FORMAT_VERSION, "outputs": ["image_embeds"], "num_samples": n, "views": views,
            "embed_dim": dim, "classes": classes, "arrays": row_layout(views, 16, dim), "shard_size": shard_size,
            "num_shards": num_shards(n, shard_size), "complete": False,
            "checksums": {"text.safetensors": file_digest(folder / "text.safetensors")}}
    rng = np.random.default_rng(0)
    for s in range(meta["num_shards"]):
        m = len(shard_rows(meta, s))
        write_shard(folder, meta, s, {
            "params": rng.standard_normal((m, views, 16), dtype=np.float32),
            "embeds": rng.standard_normal((m, views, dim), dtype=np.float32).astype(np.float16)})
    meta.update(complete=True, shards={shard_name(s): shard_digests_checksum(folder, s)
                                       for s in range(meta["num_shards"])})
    atomic_write_json(folder / "meta.json", meta)
    return meta


def cache(root: Path, n: int, views: int, dim: int, shard_sizes: list[int]) -> list[tuple[str, float, float]]:
    rows = row_layout(views, 16, dim)
    size = default_shard_size(rows)
    folder = root / "cache"
    meta = _teacher_cache(folder, n, views, dim, size)
    opened = TeacherCache(folder, meta)
    rng = np.random.default_rng(1)

    def one_epoch() -> None:  # what training reads: one random view of every image, in batches of 64
        order = rng.permutation(n)
        for s in range(0, n, 64):
            idx = torch.from_numpy(order[s : s + 64])
            opened.embeds(idx, torch.from_numpy(rng.integers(0, views, len(idx))))

    epoch = _median(one_epoch, 3)
    structural = _median(lambda: verify_cache(folder, meta, rows=False), 5)
    full = _median(lambda: TeacherCache.open(folder), 3)
    sampled = _median(lambda: verify_cache(folder, meta, verify="sample"), 3)
    mib = sum(p.stat().st_size for p in folder.rglob("embeds.npy")) / 2**20
    out = [
        (f"read one epoch of embeddings ({n} images x {views} views, D={dim}, {mib:.0f} MiB in "
         f"{meta['num_shards']} shards of {size} rows)", epoch, 1.0),
        ("TeacherCache.open: structure only (headers, sizes, checksummed small files)", structural, structural / epoch),
        ("TeacherCache.open: as used (every row's digest, <= 1 GiB)", full, full / epoch),
        ("TeacherCache.open: sampled rows (used above 1 GiB)", sampled, sampled / epoch),
    ]
    for shard_size in shard_sizes:  # the same rows in more, smaller shards: what each shard adds to an open
        other = root / f"cache-{shard_size}"
        other_meta = _teacher_cache(other, n, views, dim, shard_size)
        count = other_meta["num_shards"]
        structural = _median(lambda: verify_cache(other, other_meta, rows=False), 5)
        full = _median(lambda: TeacherCache.open(other), 3)
        out += [(f"TeacherCache.open, {count} shards of {shard_size} rows: structure only", structural,
                 structural / epoch),
                (f"TeacherCache.open, {count} shards of {shard_size} rows: as used", full, full / epoch)]
        shutil.rmtree(other)
    return out


def checkpoint(root: Path) -> list[tuple[str, float, float]]:
    import torchvision

    model = torchvision.models.resnet18(num_classes=200)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}

    def plain() -> None:
        torch.save(ckpt, root / "plain.ckpt")

    def atomic() -> None:
        atomic_write_with(root / "atomic.ckpt", lambda f: torch.save(ckpt, f))

    plain_s, atomic_s = [], []
    for _ in range(5):  # interleaved, so both see the same disk state
        plain_s.append(_median(plain, 1))
        atomic_s.append(_median(atomic, 1))
    p, a = statistics.median(plain_s), statistics.median(atomic_s)
    size = (root / "atomic.ckpt").stat().st_size / 2**20

    def lock() -> None:
        FolderLock(root / "run", "run folder").acquire().release()

    held = _median(lock, 5)
    return [(f"torch.save of a ResNet-18 training checkpoint ({size:.0f} MiB)", p, 1.0),
            ("pand's atomic save (temporary file beside it, fsync, rename)", a, a / p),
            ("taking and releasing a run folder's lock (once per run)", held, held / p)]


SECTIONS = ("images", "teacher-cache", "decoded-image-cache", "checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--cache-images", type=int, default=6000)
    parser.add_argument("--decoded-images", type=int, default=5000)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-sizes", type=int, nargs="*", default=[128, 16],
                        help="also time opening the same rows in shards of these sizes (the default size is timed "
                             "anyway)")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all)")
    ns = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="pand-integrity-bench-") as tmp:
        root = Path(tmp)
        run = {
            "images": lambda: images(root, ns.images),
            "teacher-cache": lambda: cache(root, ns.cache_images, ns.views, ns.dim, ns.shard_sizes),
            "decoded-image-cache": lambda: decoded(root, ns.decoded_images),
            "checkpoint": lambda: checkpoint(root),
        }
        sections = {name: run[name]() for name in SECTIONS if name in ns.sections}
    print("| check | seconds | ratio to the first row of its section |\n| --- | ---: | ---: |")
    for rows in sections.values():
        for label, seconds, ratio in rows:
            print(f"| {label} | {seconds:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
