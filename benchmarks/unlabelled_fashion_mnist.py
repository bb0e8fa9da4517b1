"""Test accuracy against the number of unlabelled training images, for kd, vl2lite and pand, on a CPU.

The quickstart's setting (``pand quickstart``): Fashion-MNIST, the shipped compact CLIP teacher, a ResNet-18 student
from scratch, 20 labelled images per class (val carved from them), seeds vary the labelled pool and initialisation.
Each point adds N training images from outside the labelled pool (``data.unlabelled=rest``,
``data.unlabelled_limit=N``, a seeded choice; their labels are never read):

* N = 0: the quickstart's labelled-only recipe (30 epochs, batches of 32 labelled images);
* N > 0: the same fixed budget for every N, ``--steps`` optimizer steps in batches of 128 (32 labelled + 96
  unlabelled): an epoch is one pass over the unlabelled images, capped at ``--steps / 5`` batches, with as many epochs
  as the budget needs (N=1,000: 10 batches an epoch, so 40 epochs; N=10,000 and ``all``, the 59,800 training images
  outside the 200-image labelled pool: 5 capped epochs, so the larger sets show more distinct images, not more
  steps). Cosine learning rate over the epochs, best-on-val checkpoint tested once.

pand's learned prompts come from stage 1 on the labelled pool of each seed (as in the quickstart). Writes
``results.json``, ``report.md`` (mean ± std over seeds) and ``unlabelled_curve.png``; finished runs are reused when
the script is started again with the same ``--out``.

    python benchmarks/unlabelled_fashion_mnist.py --out runs/unlabelled     # 3 methods x 4 sizes x 3 seeds, ~50 min
    python benchmarks/unlabelled_fashion_mnist.py --sizes 0,1000 --seeds 1 --methods kd
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("kd", "vl2lite", "pand")
SIZES = (0, 1000, 10000, "all")
BATCH, LABELLED_SHARE, EPOCHS_CAPPED = 128, 0.25, 5


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("status") == "done":
            return summary
    return None


def _student(qs_args, seed: int, seed_dir: Path, method: str, prompts: Path, size, steps: int) -> dict[str, Any]:
    from pand.quickstart import run_student

    name = f"{method}_n{size}"
    done = _summary(seed_dir / name)
    if done is not None:
        return done
    args = copy.copy(qs_args)
    if size == 0:
        return run_student(args, seed, seed_dir, method, prompts, run_name=name)
    unlabelled = 60_000 if size == "all" else int(size)  # "all": the limit exceeds the rest of the split
    per_batch = BATCH - round(LABELLED_SHARE * BATCH)
    cap = steps // EPOCHS_CAPPED
    batches = min(cap, unlabelled // per_batch)
    args.unlabelled_epochs = math.ceil(steps / batches)
    args.unlabelled_batch_size = BATCH
    args.overrides = [*qs_args.overrides, f"trainer.limit_train_batches={cap}"]
    return run_student(args, seed, seed_dir, method, prompts, unlabelled=unlabelled, run_name=name)


def plot(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    from pand.analysis.sweep import save_figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for method, points in results["methods"].items():
        xs = [p["unlabelled_images"] for p in points]
        ax.errorbar([max(x, 100) for x in xs], [100 * p["test_acc"] for p in points],
                    yerr=[100 * p["test_acc_std"] for p in points], marker="o", capsize=3, label=method)
    teacher = 100 * results["teacher_zero_shot"]
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher zero-shot ({teacher:.1f})")
    ax.axhline(0.95 * teacher, color="grey", ls=":", lw=1, label="95 % of the teacher")
    ax.set_xscale("log")
    ticks = sorted({max(p["unlabelled_images"], 100) for pts in results["methods"].values() for p in pts})
    ax.set_xticks(ticks, [("0" if t == 100 else f"{t:,}") for t in ticks])
    ax.set_xlabel("unlabelled training images (0 plotted at the left edge)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {results['per_class']} labels per class + unlabelled images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def report(results: dict[str, Any]) -> str:
    n = len(results["seeds"])
    sizes = [p["unlabelled_images"] for p in next(iter(results["methods"].values()))]
    lines = ["| method | " + " | ".join(f"{s:,} unlabelled" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for method, points in results["methods"].items():
        cells = [f"{100 * p['test_acc']:.2f} ± {100 * p['test_acc_std']:.2f}" if n > 1 else f"{100 * p['test_acc']:.2f}"
                 for p in points]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("| train seconds (kd) | " + " | ".join(
        f"{p['train_seconds']:.0f}" for p in results["methods"][next(iter(results["methods"]))]) + " |")
    teacher = results["teacher_zero_shot"]
    lines += ["", f"Teacher zero-shot {100 * teacher:.2f} %, CoOp teacher {100 * results['teacher_coop']:.2f} % "
              f"(95 % of zero-shot: {95 * teacher:.2f} %). {n} seed(s), {results['steps']} steps per run with "
              f"unlabelled images; {results['total_seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pand.io import atomic_write_json, atomic_write_text
    from pand.quickstart import parser, run_stage1

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/unlabelled_bench")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="comma-separated counts, or all")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of each run with unlabelled images")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    sizes = [s if s == "all" else int(s) for s in args.sizes.split(",") if s]
    qs = parser().parse_args(["--out", args.out] + (["--data-root", args.data_root] if args.data_root else []))
    out = Path(args.out)
    start = time.time()
    runs: dict[str, dict[Any, list[dict[str, Any]]]] = {m: {s: [] for s in sizes} for m in methods}
    teacher, coop = [], []
    seeds = list(range(args.seeds))
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        stage1_file = seed_dir / "stage1.json"
        if stage1_file.is_file():
            stage1 = json.loads(stage1_file.read_text())
        else:
            print(f"== seed {seed}: stage 1 (CoOp prompts on the labelled pool)", flush=True)
            stage1 = run_stage1(qs, seed, seed_dir)
            atomic_write_json(stage1_file, stage1)
        teacher.append(stage1["zero_shot_test_acc"])
        coop.append(stage1["coop_test_acc"])
        for size in sizes:
            for method in methods:
                print(f"== seed {seed}: {method} with {size} unlabelled images", flush=True)
                summary = _student(qs, seed, seed_dir, method, Path(stage1["text_features"]), size, args.steps)
                runs[method][size].append(summary)
    results: dict[str, Any] = {
        "seeds": seeds, "per_class": qs.per_class, "steps": args.steps,
        "teacher_zero_shot": statistics.fmean(teacher), "teacher_coop": statistics.fmean(coop), "methods": {},
    }
    for method in methods:
        points = []
        for size in sizes:
            rs = runs[method][size]
            accs = [r["test_acc1"] for r in rs]
            points.append({"size": size, "unlabelled_images": rs[0]["unlabelled_images"],
                           "test_acc": statistics.fmean(accs),
                           "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
                           "per_seed": accs})
        results["methods"][method] = points
    results["total_seconds"] = round(time.time() - start, 1)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report(results))
    plot(results, out / "unlabelled_curve.png")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
