"""Data-loader throughput of each way of making training views, on synthetic photo-like JPEGs.

Used by ``pand bench --loader`` and ``benchmarks/loader_throughput.py``. Modes, each timed reading the JPEGs from a
folder, the same JPEGs from WebDataset tar shards (read by index, :mod:`pand.data.tar_shards`) and the decoded-image
cache, with 0 and N loader worker processes:

* ``load``: only the image loading (decode + short-side resize, or the cache read);
* ``augment``: the full training view made per image in the loader (``data.augment_on=cpu``);
* ``device``: the loader's share of ``data.augment_on=device`` (load + the uint8 crop window); the device's share,
  :class:`~pand.data.device_augment.BatchedAugment` on whole batches (with the host-to-device copy of the windows),
  is timed separately on the chosen device, because it runs in the training process, between training steps.

Loader rows use one torch thread per process, as a multi-worker loader does; ``shards`` repeats the folder and shard
rows per core (a loader with N workers uses N cores, without workers the training process's one).
"""

from __future__ import annotations

import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pand.cache.images import DecodedImageCache, with_decoded_cache
from pand.data.base import FileDataset
from pand.data.device_augment import BatchedAugment, loader_share
from pand.data.image_ops import resize_short, to_uint8_chw
from pand.data.tar_shards import ShardDataset, read_shards
from pand.data.transforms import (
    AugmentConfig,
    ReplayableAugment,
    image_hw,
    view_generator,
)

MODES = ("load", "augment", "device")
#: Samples per tar shard, as img2dataset's default ``number_sample_per_shard`` (10,000) scaled to a benchmark's size.
SAMPLES_PER_SHARD = 256


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


def make_shards(folder: Path, dataset: FileDataset, per_shard: int = SAMPLES_PER_SHARD) -> ShardDataset:
    """The JPEGs of ``dataset`` written into tar shards of ``per_shard`` samples (``<key>.jpg`` + ``<key>.cls``, as
    img2dataset writes them) under ``folder``, read back as a dataset (the shards indexed on the way)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # a kept --dir may hold shards of another size
        old.unlink()
    for s, start in enumerate(range(0, len(dataset), per_shard)):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, len(dataset))):
                for ext, data in (("jpg", dataset.path(i).read_bytes()), ("cls", str(dataset.targets[i]).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    samples = read_shards(str(folder), setting="bench")
    return ShardDataset("synthetic", "train", dataset.classes, samples, [int(c) for c in samples.cls])


class Views(Dataset):
    """Like pand.engine.data.TrainViews (epoch 0) in each mode: what the loader hands to the training process."""

    def __init__(self, dataset, augment: ReplayableAugment, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.dataset, self.augment, self.mode = dataset, augment, mode
        self.make = loader_share(augment, "device" if mode == "device" else "cpu")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset.load_image(i)
        if self.mode == "load":  # what the augmentation starts from: the short-side-resized uint8 image
            x = resize_short(to_uint8_chw(image), self.augment.config.resize_size)
            return x.shape[-2] * x.shape[-1], self.dataset.targets[i]
        params = self.augment.sample(view_generator(0, 0, i), image_hw(image))
        return self.make(image, params), params, self.dataset.targets[i]


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_device_augment(dataset, augment: ReplayableAugment, device: str | torch.device, batch_size: int,
                           steps: int = 5, warmup: int = 1) -> dict:
    """Images/s of the device's share of ``data.augment_on=device``: copy a batch of uint8 windows (pinned when the
    device is a GPU) and its params to ``device`` and make the views there; median over ``steps`` batches."""
    device = torch.device(device)
    batched = BatchedAugment(augment)
    views = Views(dataset, augment, "device")
    n = len(views)
    batches = []
    for s in range(warmup + steps):
        items = [views[(s * batch_size + k) % n] for k in range(batch_size)]
        windows, params = torch.stack([w for w, _, _ in items]), torch.stack([p for _, p, _ in items])
        if device.type == "cuda":
            windows, params = windows.pin_memory(), params.pin_memory()
        batches.append((windows, params))
    times = []
    for s, (windows, params) in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        batched(windows.to(device, non_blocking=True), params.to(device, non_blocking=True))
        _sync(device)
        if s >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"device": str(device), "batch_size": batch_size, "ms_per_batch": round(seconds * 1000, 2),
            "img_per_s": round(batch_size / seconds, 1)}


def measure_loader_throughput(
    num_images: int = 600, height: int = 375, width: int = 500, workers=(0, 2), batch_size: int = 32,
    modes=MODES, folder: str | os.PathLike | None = None, image_size: int = 224, resize_size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Images per second of a training loader reading JPEGs from a folder, the same JPEGs from tar shards, and the
    decoded cache, in each mode, side by side in one process; with ``device`` in ``modes`` also the device's share
    of ``data.augment_on=device`` on ``device``."""
    workers = list(dict.fromkeys([workers] if isinstance(workers, int) else workers))
    resize_size = int(resize_size) if resize_size is not None else round(image_size * 256 / 224)
    augment = ReplayableAugment(AugmentConfig(image_size=image_size, resize_size=resize_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per loader process, as in a real multi-worker loader
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(folder) if folder is not None else Path(tmp)
            t = time.perf_counter()
            dataset = make_jpegs(root / "jpegs", num_images, height, width)
            t_jpegs = time.perf_counter() - t
            cache_dir = root / f"decoded-{resize_size}"
            if cache_dir.exists():  # time a fresh build
                DecodedImageCache._clear(cache_dir)
            t = time.perf_counter()
            cached = with_decoded_cache(dataset, cache_dir, resize_size, num_workers=max(workers), progress=False)
            t_build = time.perf_counter() - t
            cache_mb = (cache_dir / "pixels.u8").stat().st_size / 2**20
            jpeg_mb = sum(os.path.getsize(dataset.path(i)) for i in range(len(dataset))) / 2**20
            t = time.perf_counter()
            sharded = make_shards(root / "shards", dataset)
            t_shards = time.perf_counter() - t
            rows, per_core = [], []
            for mode in modes:
                for w in workers:
                    row = {"mode": mode, "workers": w}
                    for source, ds in (("jpeg", dataset), ("shard", sharded), ("cache", cached)):
                        row[f"{source}_img_per_s"] = round(measure(ds, augment, mode, w, batch_size)["img_per_s"], 1)
                    row["speedup"] = round(row["cache_img_per_s"] / row["jpeg_img_per_s"], 2)
                    rows.append(row)
                    cores = max(1, w)
                    per_core.append({"mode": mode, "workers": w, "cores": cores,
                                     "folder_img_per_s_per_core": round(row["jpeg_img_per_s"] / cores, 1),
                                     "shard_img_per_s_per_core": round(row["shard_img_per_s"] / cores, 1),
                                     "shard_vs_folder": round(row["shard_img_per_s"] / row["jpeg_img_per_s"], 2)})
            torch.set_num_threads(threads)  # the device's share runs in the training process, with its threads
            device_share = measure_device_augment(cached, augment, device, batch_size) if "device" in modes else None
    finally:
        torch.set_num_threads(threads)
    result = {
        "images": num_images, "image_hw": [height, width], "resize_size": resize_size, "image_size": image_size,
        "batch_size": batch_size, "cpu_count": os.cpu_count(), "write_jpegs_s": round(t_jpegs, 2),
        "build_cache_s": round(t_build, 2), "jpeg_mb": round(jpeg_mb, 1), "cache_mb": round(cache_mb, 1),
        "rows": rows,
        "shards": {"shards": len(sharded.paths), "samples_per_shard": SAMPLES_PER_SHARD,
                   "write_and_index_s": round(t_shards, 2), "rows": per_core},
    }
    if device_share is not None:
        result["device_augment"] = device_share
    return result


def run_estimates(loader: dict, student_img_per_s: float) -> list[dict]:
    """What limits a training run on each path: images/s of the whole run estimated from its parts.

    ``augment_on=cpu``: the loader and the training steps overlap, so the run goes at the slower of the two.
    ``augment_on=device``: the loader (load + crop) overlaps the steps, but the batched augmentation runs on the
    training device between steps, so the device side costs ``1 / student + 1 / augmentation`` seconds per image.
    """
    device_share = (loader.get("device_augment") or {}).get("img_per_s")
    out = []
    for row in loader["rows"]:
        if row["mode"] == "load":
            continue
        for source in ("jpeg", "cache"):
            feed = row[f"{source}_img_per_s"]
            if row["mode"] == "device":
                if not device_share:
                    continue
                step = 1.0 / (1.0 / student_img_per_s + 1.0 / device_share)
            else:
                step = student_img_per_s
            limit = "loader" if feed < step else ("student step" if row["mode"] == "augment" else
                                                 "student step + views")
            out.append({"augment_on": "cpu" if row["mode"] == "augment" else "device", "source": source,
                        "workers": row["workers"], "loader_img_per_s": feed, "device_side_img_per_s": round(step, 1),
                        "run_img_per_s": round(min(feed, step), 1), "limited_by": limit})
    return out
