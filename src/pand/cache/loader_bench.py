"""Data-loader throughput with and without the decoded-image cache, on synthetic photo-like JPEGs.

Used by ``pand bench --loader`` and ``benchmarks/loader_throughput.py``. ``load`` times only the image loading
(decode + short-side resize, or the cache read), ``augment`` the full training view (ReplayableAugment, 224/256).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pand.cache.images import DecodedImageCache, with_decoded_cache
from pand.data.base import FileDataset
from pand.data.transforms import AugmentConfig, ReplayableAugment, _resize_short, _to_uint8_chw, view_generator


def make_jpegs(folder: Path, n: int, h: int, w: int, n_classes: int = 10) -> FileDataset:
    rng = np.random.default_rng(0)
    relpaths, targets = [], []
    for i in range(n):
        c = i % n_classes
        rel = f"class_{c:02d}/img_{i:05d}.jpg"
        path = folder / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(low, "RGB").resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path, format="JPEG", quality=90)
        relpaths.append(rel)
        targets.append(c)
    return FileDataset("synthetic", "train", [f"class {c}" for c in range(n_classes)], folder, relpaths, targets)


class Views(Dataset):
    """Like pand.engine.data.TrainViews (epoch 0): the augmented view, its params and the label."""

    def __init__(self, dataset, augment: ReplayableAugment, mode: str) -> None:
        self.dataset, self.augment, self.mode = dataset, augment, mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset.load_image(i)
        if self.mode == "load":  # what the augmentation starts from: the short-side-resized uint8 image
            x = _resize_short(_to_uint8_chw(image), self.augment.config.resize_size)
            return x.shape[-2] * x.shape[-1], self.dataset.targets[i]
        view, params = self.augment(image, view_generator(0, 0, i))
        return view, params, self.dataset.targets[i]


def measure(dataset, augment, mode: str, workers: int, batch_size: int) -> dict:
    loader = DataLoader(
        Views(dataset, augment, mode),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        persistent_workers=False,
    )
    t0 = time.perf_counter()
    n = 0
    t_first = None
    n_first = 0
    for batch in loader:
        n += len(batch[-1])
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    steady = (n - n_first) / (t1 - t_first) if t1 > t_first else float("nan")
    return {"images": n, "seconds": t1 - t0, "img_per_s": n / (t1 - t0), "img_per_s_after_first_batch": steady}


def measure_loader_throughput(
    num_images: int = 600, height: int = 375, width: int = 500, workers=(0, 2), batch_size: int = 32,
    modes=("load", "augment"), folder: str | os.PathLike | None = None,
) -> dict:
    """Images per second of a training loader reading JPEGs vs the decoded cache, side by side in one process."""
    workers = [workers] if isinstance(workers, int) else list(workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per loader process, as in a real multi-worker loader
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(folder) if folder is not None else Path(tmp)
            t = time.perf_counter()
            dataset = make_jpegs(root / "jpegs", num_images, height, width)
            t_jpegs = time.perf_counter() - t
            augment = ReplayableAugment(AugmentConfig())
            resize = augment.config.resize_size
            cache_dir = root / f"decoded-{resize}"
            if cache_dir.exists():  # time a fresh build
                DecodedImageCache._clear(cache_dir)
            t = time.perf_counter()
            cached = with_decoded_cache(dataset, cache_dir, resize, num_workers=max(workers), progress=False)
            t_build = time.perf_counter() - t
            cache_mb = (cache_dir / "pixels.u8").stat().st_size / 2**20
            jpeg_mb = sum(os.path.getsize(dataset.path(i)) for i in range(len(dataset))) / 2**20
            rows = []
            for mode in modes:
                for w in workers:
                    row = {"mode": mode, "workers": w}
                    for source, ds in (("jpeg", dataset), ("cache", cached)):
                        row[f"{source}_img_per_s"] = round(measure(ds, augment, mode, w, batch_size)["img_per_s"], 1)
                    row["speedup"] = round(row["cache_img_per_s"] / row["jpeg_img_per_s"], 2)
                    rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return {
        "images": num_images, "image_hw": [height, width], "resize_size": resize,
        "image_size": augment.config.image_size, "batch_size": batch_size, "cpu_count": os.cpu_count(),
        "write_jpegs_s": round(t_jpegs, 2), "build_cache_s": round(t_build, 2), "jpeg_mb": round(jpeg_mb, 1),
        "cache_mb": round(cache_mb, 1), "rows": rows,
    }
