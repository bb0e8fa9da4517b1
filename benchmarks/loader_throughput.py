"""Data-loader throughput with and without the decoded-image cache (see pand.cache.loader_bench).

    python benchmarks/loader_throughput.py                   # table
    python benchmarks/loader_throughput.py --json            # machine-readable
    python benchmarks/loader_throughput.py --images 200 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pand.cache.loader_bench import measure_loader_throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mode", choices=("load", "augment", "both"), default="both")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the JPEGs and the cache (default: temp)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    modes = ("load", "augment") if args.mode == "both" else (args.mode,)
    r = measure_loader_throughput(args.images, args.height, args.width, args.workers, args.batch_size, modes, args.dir)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['images']} JPEGs {args.height}x{args.width} ({r['jpeg_mb']} MiB) -> decoded cache at short side "
          f"{r['resize_size']} ({r['cache_mb']} MiB), built in {r['build_cache_s']} s; {r['cpu_count']} CPUs")
    print(f"{'mode':8} {'workers':>7} {'jpeg img/s':>11} {'cache img/s':>12} {'speed-up':>9}")
    for row in r["rows"]:
        print(f"{row['mode']:8} {row['workers']:>7} {row['jpeg_img_per_s']:>11.1f} {row['cache_img_per_s']:>12.1f} "
              f"{row['speedup']:>8.2f}x")


if __name__ == "__main__":
    main()
