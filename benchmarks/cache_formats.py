"""How a training step reads the teacher cache: per-shard .npy memory maps (pand's format) vs the same rows stored as
WebDataset samples (one tar member per image holding its K views, as MobileCLIP's DataCompDR stores them), read by
random access through a tar offset index, and vs streaming those tars in order.

A training step reads one view of each of B random images. The memory map reads that row; a sample format reads and
decodes the image's whole sample (all K views) to use one. Writing is measured too (one shard, all rows).

    python benchmarks/cache_formats.py [--images 20000] [--views 10] [--dim 512] [--batch 256] [--steps 50]

Run it with nothing else on the machine; page cache warm (every file is read once before timing), one process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from pand.cache.teacher.layout import MAX_SHARD_ROWS, open_shard, row_layout, shard_rows, write_shard


def _meta(n: int, k: int, d: int, p: int, shard_size: int) -> dict:
    return {"num_samples": n, "views": k, "embed_dim": d, "outputs": ["image_embeds"], "shard_size": shard_size,
            "num_shards": -(-n // shard_size), "arrays": row_layout(k, p, d)}


def _write_npy_shards(folder: Path, meta: dict, params: np.ndarray, embeds: np.ndarray) -> float:
    start = time.perf_counter()
    for s in range(meta["num_shards"]):
        rows = shard_rows(meta, s)
        write_shard(folder, meta, s, {"params": params[rows.start:rows.stop], "embeds": embeds[rows.start:rows.stop]})
    return time.perf_counter() - start


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_tars(folder: Path, meta: dict, params: np.ndarray, embeds: np.ndarray) -> tuple[float, dict]:
    """One tar per shard, one sample per image; returns the time and an index: image -> (tar, offset, size) of each
    member."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[int, dict[str, tuple[int, int, int]]] = {}
    start = time.perf_counter()
    for s in range(meta["num_shards"]):
        with tarfile.open(folder / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in shard_rows(meta, s):
                for name, array in (("params", params[i]), ("embeds", embeds[i])):
                    data = _npy(array)
                    info = tarfile.TarInfo(f"{i:09d}.{name}.npy")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with tarfile.open(folder / f"{s:05d}.tar") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                index.setdefault(int(key), {})[ext] = (s, member.offset_data, member.size)
    return time.perf_counter() - start, index


def _median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--params", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n, k, d, p = args.images, args.views, args.dim, args.params
    rng = np.random.default_rng(0)
    params = rng.random((n, k, p), dtype=np.float32)
    embeds = rng.standard_normal((n, k, d)).astype(np.float16)
    meta = _meta(n, k, d, p, min(MAX_SHARD_ROWS, n))
    root = Path(tempfile.mkdtemp(prefix="pand-cache-formats-"))
    try:
        npy_write = _write_npy_shards(root / "npy", meta, params, embeds)
        tar_write, index = _write_tars(root / "tars", meta, params, embeds)
        shards = {}

        def npy_step() -> None:
            idx = rng.integers(0, n, args.batch)
            view = rng.integers(0, k, args.batch)
            shard, row = np.divmod(idx, meta["shard_size"])
            out = np.empty((args.batch, d), np.float16)
            for s in np.unique(shard):
                if s not in shards:
                    shards[s] = open_shard(root / "npy", meta, meta["arrays"], int(s))
                here = shard == s
                out[here] = shards[s]["embeds"][row[here], view[here]]

        handles = {}

        def tar_step() -> None:
            idx = rng.integers(0, n, args.batch)
            view = rng.integers(0, k, args.batch)
            out = np.empty((args.batch, d), np.float16)
            for j, (i, v) in enumerate(zip(idx.tolist(), view.tolist())):
                s, offset, size = index[i]["embeds.npy"]
                f = handles.get(s) or handles.setdefault(s, open(root / "tars" / f"{s:05d}.tar", "rb"))
                f.seek(offset)
                out[j] = np.load(io.BytesIO(f.read(size)), allow_pickle=False)[v]

        def stream_all() -> None:
            for s in range(meta["num_shards"]):
                with tarfile.open(root / "tars" / f"{s:05d}.tar") as tar:
                    for member in tar:
                        if member.name.endswith("embeds.npy"):
                            np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)

        for path in root.rglob("*"):  # warm the page cache: both formats read from memory
            if path.is_file():
                path.read_bytes()
        npy_ms = _median_ms(npy_step, args.steps)
        tar_ms = _median_ms(tar_step, args.steps)
        start = time.perf_counter()
        stream_all()
        stream_per_image_us = (time.perf_counter() - start) / n * 1e6
        size = {name: sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
                for name in ("npy", "tars")}
        result = {
            "images": n, "views": k, "dim": d, "batch": args.batch, "shard_size": meta["shard_size"],
            "npy_memmap_ms_per_step": round(npy_ms, 2), "tar_indexed_ms_per_step": round(tar_ms, 2),
            "tar_stream_us_per_image": round(stream_per_image_us, 1),
            "npy_write_s": round(npy_write, 2), "tar_write_s": round(tar_write, 2),
            "npy_bytes": size["npy"], "tar_bytes": size["tars"],
        }
    finally:
        for f in handles.values() if "handles" in locals() else ():
            f.close()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{n} images x {k} views, D={d} float16, batch {args.batch} random rows ({os.cpu_count()} CPUs)")
    print(f"  per-shard .npy memory maps (pand):     {result['npy_memmap_ms_per_step']:8.2f} ms/step, "
          f"write {result['npy_write_s']:.2f} s, {result['npy_bytes'] / 1e6:.1f} MB")
    print(f"  WebDataset samples, tar offset index:  {result['tar_indexed_ms_per_step']:8.2f} ms/step, "
          f"write {result['tar_write_s']:.2f} s, {result['tar_bytes'] / 1e6:.1f} MB")
    print(f"  WebDataset samples, streamed in order: {result['tar_stream_us_per_image']:8.1f} us/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
