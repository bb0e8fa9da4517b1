"""What pand's safety checks cost, each measured side by side with the work it protects, in one run.

* image verification before training (every image decoded once) and the content digests that find an image in two
  splits (sha256 of every file) vs one epoch of the training data path on the same images, and their remembered
  re-runs;
* opening the decoded-image cache with its per-chunk digests vs reading one epoch of images from it;
* ``TeacherCache.open`` with its integrity checks (header and size of every array, per-row blake2b digests) vs reading
  one epoch of embeddings from the same cache;
* an atomic checkpoint save (temporary file beside the real one, fsync, rename) vs a plain ``torch.save`` of the same
  ResNet-18 training checkpoint (weights + AdamW state), and taking a run folder's lock.

    python benchmarks/integrity_checks.py [--images 600] [--cache-images 6000] [--views 10] [--dim 1024]
                                          [--decoded-images 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pand.cache.images import DecodedImageCache
from pand.cache.integrity import allocate_npy, array_layout, file_digest, row_digest, verify_cache
from pand.bench.loader import make_jpegs
from pand.cache.teacher import FORMAT_VERSION, TeacherCache
from pand.data.transforms import AugmentConfig, ReplayableAugment, view_generator
from pand.data.overlap import item_digests
from pand.data.verify import verify_splits
from pand.io import atomic_write_json, atomic_write_with
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


def cache(root: Path, n: int, views: int, dim: int) -> list[tuple[str, float, float]]:
    folder = root / "cache"
    folder.mkdir()
    layout = array_layout(n, views, 16, dim)
    for name, spec in layout.items():
        allocate_npy(folder / f"{name}.npy", spec)
    rng = np.random.default_rng(0)
    params, embeds = (np.load(folder / f"{k}.npy", mmap_mode="r+") for k in ("params", "embeds"))
    digests, done = (np.load(folder / f"{k}.npy", mmap_mode="r+") for k in ("digests", "done"))
    for s in range(0, n, 500):
        e = min(n, s + 500)
        params[s:e] = rng.standard_normal((e - s, views, 16), dtype=np.float32)
        embeds[s:e] = rng.standard_normal((e - s, views, dim), dtype=np.float32).astype(np.float16)
    for i in range(n):
        digests[i, 0] = np.frombuffer(row_digest(params[i]), np.uint8)
        digests[i, 1] = np.frombuffer(row_digest(embeds[i]), np.uint8)
    done[:] = True
    for a in (params, embeds, digests, done):
        a.flush()
    del params, embeds, digests, done
    classes = [f"class {i}" for i in range(200)]
    save_tensors(folder / "text.safetensors", {"text_embeds": torch.zeros(len(classes), dim)}, {})
    meta = {"version": FORMAT_VERSION, "outputs": ["image_embeds"], "num_samples": n, "views": views, "embed_dim": dim, "classes": classes, "arrays": layout,
            "complete": True, "checksums": {"text.safetensors": file_digest(folder / "text.safetensors"),
                                            "digests.npy": file_digest(folder / "digests.npy")}}
    atomic_write_json(folder / "meta.json", meta)
    opened = TeacherCache(folder, meta)

    def one_epoch() -> None:  # what training reads: one random view of every image, in batches of 64
        order = rng.permutation(n)
        for s in range(0, n, 64):
            idx = torch.from_numpy(order[s : s + 64])
            opened.embeds(idx, torch.from_numpy(rng.integers(0, views, len(idx))))

    epoch = _median(one_epoch, 3)
    structural = _median(lambda: verify_cache(folder, meta, rows=False), 5)
    full = _median(lambda: TeacherCache.open(folder), 3)
    sampled = _median(lambda: verify_cache(folder, meta, verify="sample"), 3)
    size = (folder / "embeds.npy").stat().st_size / 2**20
    return [
        (f"read one epoch of embeddings ({n} images x {views} views, D={dim}, {size:.0f} MiB file)", epoch, 1.0),
        ("TeacherCache.open: structure only (headers, sizes, checksummed small files)", structural, structural / epoch),
        ("TeacherCache.open: as used (every row's digest, <= 1 GiB)", full, full / epoch),
        ("TeacherCache.open: sampled rows (used above 1 GiB)", sampled, sampled / epoch),
    ]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--cache-images", type=int, default=6000)
    parser.add_argument("--decoded-images", type=int, default=5000)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1024)
    ns = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="pand-integrity-bench-") as tmp:
        root = Path(tmp)
        sections = {
            "images": images(root, ns.images),
            "teacher cache": cache(root, ns.cache_images, ns.views, ns.dim),
            "decoded-image cache": decoded(root, ns.decoded_images),
            "checkpoint": checkpoint(root),
        }
    print("| check | seconds | ratio to the first row of its section |\n| --- | ---: | ---: |")
    for rows in sections.values():
        for label, seconds, ratio in rows:
            print(f"| {label} | {seconds:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
