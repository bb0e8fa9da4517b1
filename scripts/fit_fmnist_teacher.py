#!/usr/bin/env python
"""Re-fit the shipped stand-in teacher: src/pand/assets/fmnist-clip.safetensors (+ fmnist-clip.json, the report).

Uses the defaults of pand.teachers.standin_fit, which produced the shipped file, on the system Fashion-MNIST
(/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist). Same as `pand teacher fit`.

    .venv/bin/python scripts/fit_fmnist_teacher.py [--out PATH] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import sys

from pand.teachers.standin_fit import (
    ASSET_PATH,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_NUM_THREADS,
    DEFAULT_SEED,
    fit_teacher,
    report_path,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSET_PATH))
    p.add_argument("--data-root", default=None)
    ns = p.parse_args()
    report = fit_teacher(
        ns.out,
        data_root=ns.data_root,
        epochs=DEFAULT_EPOCHS,
        batch_size=DEFAULT_BATCH_SIZE,
        lr=DEFAULT_LR,
        seed=DEFAULT_SEED,
        device="cpu",
        progress=True,
        num_threads=DEFAULT_NUM_THREADS,
    )
    print(
        f"wrote {ns.out} and {report_path(ns.out)}: {report['params']:,} params, fit {report['seconds']} s, "
        f"zero-shot top-1 val {report['val_top1']:.4f} test {report['test_top1']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
