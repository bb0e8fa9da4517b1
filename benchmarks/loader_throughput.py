"""Data-loader throughput of each view path: JPEGs from a folder, the same JPEGs from tar shards, the decoded cache.

See pand.bench.loader.

    python benchmarks/loader_throughput.py                   # table, 224 px views, device's share on the CPU
    python benchmarks/loader_throughput.py --device cuda     # the device's share of augment_on=device on a GPU
    python benchmarks/loader_throughput.py --json            # machine-readable
    python benchmarks/loader_throughput.py --images 200 --workers 0 2 4 --mode device

`pand bench --loader` runs the same measurement next to the student's training step of the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pand.bench.loader import MODES, measure_loader_throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=224, help="view size (resize: image_size * 256 / 224)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mode", choices=(*MODES, "all"), default="all")
    ap.add_argument("--device", default="cpu", help="where the device's share of augment_on=device runs")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the JPEGs and the cache (default: temp)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    modes = MODES if args.mode == "all" else (args.mode,)
    r = measure_loader_throughput(args.images, args.height, args.width, args.workers, args.batch_size, modes, args.dir,
                                  image_size=args.image_size, device=args.device)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['images']} JPEGs {args.height}x{args.width} ({r['jpeg_mb']} MiB) -> decoded cache at short side "
          f"{r['resize_size']} ({r['cache_mb']} MiB), built in {r['build_cache_s']} s; {r['image_size']} px views, "
          f"batch {r['batch_size']}; {r['cpu_count']} CPUs")
    print(f"{'mode':8} {'workers':>7} {'jpeg img/s':>11} {'shard img/s':>12} {'cache img/s':>12} {'speed-up':>9}")
    for row in r["rows"]:
        print(f"{row['mode']:8} {row['workers']:>7} {row['jpeg_img_per_s']:>11.1f} {row['shard_img_per_s']:>12.1f} "
              f"{row['cache_img_per_s']:>12.1f} {row['speedup']:>8.2f}x")
    shards = r["shards"]
    n = shards["shards"]
    print(f"the same JPEGs in {n} tar shard{'s' if n > 1 else ''} of up to {shards['samples_per_shard']} samples "
          f"(written and indexed in {shards['write_and_index_s']} s), images/s per core:")
    print(f"{'mode':8} {'cores':>5} {'folder':>8} {'shards':>8} {'shards/folder':>14}")
    for row in shards["rows"]:
        print(f"{row['mode']:8} {row['cores']:>5} {row['folder_img_per_s_per_core']:>8.1f} "
              f"{row['shard_img_per_s_per_core']:>8.1f} {row['shard_vs_folder']:>13.2f}x")
    share = r.get("device_augment")
    if share:
        print(f"device's share of augment_on=device on {share['device']}: {share['img_per_s']:.1f} img/s "
              f"({share['ms_per_batch']:.1f} ms per batch of {share['batch_size']}, host-to-device copy included)")


if __name__ == "__main__":
    main()
