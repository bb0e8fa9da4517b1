"""Which terms of the open-vocabulary student matter for classes it never saw: an ablation on Fashion-MNIST, on a CPU.

The quickstart's setting (``pand quickstart``): the shipped compact CLIP teacher, a ResNet-18 student from scratch, 20
labelled images per class (val carved from them), 30 epochs, and the base-to-novel split (5 seen classes, 5 never
seen, the same halves for every seed). Each variant changes only the method's options, from KDEOV's two terms
(``method.icl_weight=0``: CLIP-KD's ICL, the method's default since, is ablated in ``open_vocab_protocols.py``):

* ``both``: cosine distillation to the teacher's image embedding + label-aware InfoNCE;
* ``distill``: distillation alone (``align_weight=0``: no labels used at all);
* ``align``: InfoNCE alone (``distill_weight=0``: the teacher's image tower is never used);
* ``both_l2``: MSE instead of cosine distillation;
* ``film`` / ``cross_attention``: the default losses with text-conditioned fusion.

Every student is selected on base-class val images and tested once. The table gives mean and standard deviation over
seeds of top-1 on base (among base classes), novel (among novel classes), their harmonic mean, text -> image retrieval
mAP over all test images, and training seconds (which show the cost of fusion's per-class head passes).

    python benchmarks/open_vocab_fashion_mnist.py --out runs/open_vocab      # 6 variants x 3 seeds, ~20 min, 2 cores
    python benchmarks/open_vocab_fashion_mnist.py --variants both,distill --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: Every variant starts from KDEOV's losses, so that its figures do not move with the method's defaults.
KDEOV = ["method.icl_weight=0"]
VARIANTS = {
    "both": [],
    "distill": ["method.align_weight=0"],
    "align": ["method.distill_weight=0"],
    "both_l2": ["method.distill=l2"],
    "film": ["method.fusion=film"],
    "cross_attention": ["method.fusion=cross_attention"],
}
KEYS = ("base", "novel", "hm")


def main(argv: list[str] | None = None) -> int:
    from pand.quickstart import OPEN_VOCAB, parser, run_student

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/open_vocab_bench")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    start = time.time()
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    teacher: dict[str, float] | None = None
    for seed in range(args.seeds):
        for variant in variants:
            qs = parser().parse_args(["--epochs", str(args.epochs), *(["--data-root", args.data_root]
                                                                      if args.data_root else []),
                                      *KDEOV, *VARIANTS[variant]])
            print(f"== seed {seed}: {variant}", flush=True)
            summary = run_student(qs, seed, out / variant / f"seed{seed}", OPEN_VOCAB, Path("unused"))
            ov = summary["open_vocab"]
            results[variant].append({**{k: ov["student"][k] for k in KEYS}, "mAP": ov["student"]["retrieval"]["mAP"],
                                     "train_seconds": summary["train_seconds"]})
            teacher = {**{k: ov["teacher"][k] for k in KEYS}, "mAP": ov["teacher"]["retrieval"]["mAP"]}
    rows = []
    for variant, runs in results.items():
        row = {"variant": variant, "options": " ".join(VARIANTS[variant]) or "(defaults)"}
        for key in (*KEYS, "mAP", "train_seconds"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    table = ["| variant | options | base (%) | novel (%) | HM (%) | mAP (%) | train (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{100 * r[k]:.2f} ± {100 * r[k + '_std']:.2f}" for k in (*KEYS, "mAP")]
        table.append(f"| {r['variant']} | `{r['options']}` | " + " | ".join(cells) + f" | {r['train_seconds']:.1f} |")
    if teacher:
        table.append("| teacher zero-shot | | " + " | ".join(f"{100 * teacher[k]:.2f}" for k in (*KEYS, "mAP"))
                     + " | - |")
    text = "\n".join(table)
    print(text)
    print(f"total: {time.time() - start:.0f} s, {args.seeds} seed(s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "teacher": teacher, "per_seed": results}, indent=1))
    (out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
