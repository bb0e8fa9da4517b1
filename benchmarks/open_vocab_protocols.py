"""Open-vocabulary students with unlabelled images: each protocol, each loss term, each amount of data (Fashion-MNIST,
a CPU).

The quickstart's base-to-novel setting (``pand quickstart``): the shipped compact CLIP teacher, a ResNet-18 student
from scratch, 20 labelled images for each of the 5 seen classes (16 train + 4 val), the same 5 seen / 5 unseen classes
for every seed; a seed changes the labelled pool, the unlabelled draw and the initialisation. Runs with unlabelled
images add ``N`` Fashion-MNIST training images from outside the labelled pool (``data.unlabelled=rest``, their labels
never read) and train 5 epochs over them in batches of 128 (a quarter from the labelled pool), as the quickstart does;
so a larger ``N`` is more images *and* more steps.

Four groups of runs, each cell the mean ± std over seeds:

* ``protocol`` (KDEOV's losses: cosine distillation + label-aware InfoNCE, ``method.icl_weight=0``, N = 5,000):
  labelled-only (no unlabelled image), ``strict`` (unlabelled images of the seen classes only), ``transductive`` (of
  all 10 classes, no unseen label or name read), ``label-free`` (no labelled image at all: every image unlabelled, val
  labelled by the teacher);
* ``loss`` (transductive, N = 5,000): KDEOV's two terms, ``+icl`` (CLIP-KD's ICL), ``+affinity`` (TinyCLIP's affinity
  mimicking), both, and distillation alone (``align_weight=0``). The variant with the best mean val score is chosen
  (``+icl`` was, and became the method's default: every variant's overrides are spelled out, so the figures do not
  move with the defaults);
* ``recipe``: the four protocols again, with the chosen losses;
* ``size`` (transductive, the chosen losses): N = 1,000 / 2,500 / 5,000.

Every run selects its checkpoint on the seen classes' val images and is tested once. ``val`` in the report is that
selection score: the only figure a choice between variants may use (no unseen label exists in training, by protocol).
Writes ``results.json``, ``report.md`` and ``open_vocab_protocols.png``; finished runs are reused when the script is
started again with the same ``--out``.

    python benchmarks/open_vocab_protocols.py --out runs/open_vocab_protocols        # 3 seeds, every group
    python benchmarks/open_vocab_protocols.py --groups protocol --seeds 1
    python benchmarks/open_vocab_protocols.py --size-seeds 1        # the size curve on one seed only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

UNLABELLED = 5000
TRANSDUCTIVE = "data.novel_protocol=transductive"
#: protocol -> (unlabelled images, overrides)
PROTOCOLS: dict[str, tuple[int, tuple[str, ...]]] = {
    "labelled only": (0, ()),
    "strict": (UNLABELLED, ("data.novel_protocol=strict",)),
    "transductive": (UNLABELLED, (TRANSDUCTIVE,)),
    "label-free": (UNLABELLED, ("data.samples_per_class=0",)),
}
#: KDEOV's own losses, the protocol group's: cosine distillation + label-aware InfoNCE.
#: Epochs over the unlabelled images: the schedule the figures of benchmarks/README.md were measured with (the
#: quickstart's own default has since become 3).
UNLABELLED_EPOCHS = 5
KDEOV = ("method.icl_weight=0", "method.affinity_weight=0")
#: loss variant -> overrides of method=openvocab, every weight spelled out (the first is KDEOV's)
LOSSES: dict[str, tuple[str, ...]] = {
    "kdeov": KDEOV,
    "+icl": ("method.icl_weight=1", "method.affinity_weight=0"),
    "+affinity": ("method.icl_weight=0", "method.affinity_weight=1"),
    "+icl +affinity": ("method.icl_weight=1", "method.affinity_weight=1"),
    "distill only": (*KDEOV, "method.align_weight=0"),
}
SIZES = (1000, 2500, UNLABELLED)
GROUP_NAMES = ("protocol", "loss", "recipe", "size")


def group_runs(group: str, chosen: tuple[str, ...] = ()) -> dict[str, tuple[int, tuple[str, ...]]]:
    """The runs of a group: variant -> (unlabelled images, overrides). ``chosen``: the losses selected on val."""
    if group == "protocol":
        return {name: (n, (*overrides, *KDEOV)) for name, (n, overrides) in PROTOCOLS.items()}
    if group == "loss":
        return {name: (UNLABELLED, (TRANSDUCTIVE, *extra)) for name, extra in LOSSES.items()}
    if group == "recipe":
        return {name: (n, (*overrides, *chosen)) for name, (n, overrides) in PROTOCOLS.items()}
    return {f"{n:,}": (n, (TRANSDUCTIVE, *chosen)) for n in SIZES}


def student_run(qs, seed: int, seed_dir: Path, unlabelled: int, overrides: tuple[str, ...], label: str) -> dict:
    """The summary of one open-vocabulary student run: read back when a finished run is in ``seed_dir``, resumed from
    its ``last.ckpt`` when one stopped midway, else trained."""
    from pand.quickstart import OPEN_VOCAB, run_student

    name = _run_name(unlabelled, overrides)
    summary = _finished(seed_dir / name)
    if summary is None:
        print(f"== {label}, seed {seed}", flush=True)
        last = seed_dir / name / "checkpoints" / "last.ckpt"
        resume = (f"ckpt_path={last}",) if last.is_file() else ()
        summary = run_student(qs, seed, seed_dir, OPEN_VOCAB, Path("unused"), unlabelled=unlabelled or None,
                              run_name=name, extra=(*overrides, *resume))
    return summary


def choose_losses(rows: dict[str, list[dict[str, float]]]) -> str:
    """The loss variant with the best mean val score (seen classes' val images: nothing else may choose); the
    earlier, simpler variant on a tie."""
    scores = {name: statistics.fmean(r["val"] for r in runs) for name, runs in rows.items() if runs}
    return max(scores, key=lambda name: (scores[name], -list(LOSSES).index(name)))


KEYS = ("base", "novel", "hm")


def _run_name(unlabelled: int, overrides: tuple[str, ...]) -> str:
    """One folder per distinct run, so that a variant shared by two groups trains once."""
    parts = [f"n{unlabelled}"] + [o.split(".", 1)[-1].replace("=", "-") for o in overrides]
    return "_".join(parts)


def _finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("status") == "done" and "open_vocab" in summary:
            return summary
    return None


def _row(summary: dict[str, Any]) -> dict[str, float]:
    ov = summary["open_vocab"]
    return {**{k: ov["student"][k] for k in KEYS}, "val": summary["val_acc1"], "train_seconds": summary["train_seconds"],
            **{f"teacher_{k}": ov["teacher"][k] for k in KEYS}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_seed: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group, variants in per_seed.items():
        out[group] = {}
        for variant, runs in variants.items():
            if runs:
                out[group][variant] = {k: _mean_std([r[k] for r in runs]) for k in runs[0]} | {"seeds": len(runs)}
    return out


def report(results: dict[str, Any]) -> str:
    lines = []
    teacher = None
    for group, variants in results["groups"].items():
        lines += [f"### {group}", "", "| variant | seeds | base (%) | novel (%) | HM (%) | HM / teacher | val (%) | "
                  "train (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for variant, r in variants.items():
            teacher = r["teacher_hm"][0]
            cells = [f"{100 * r[k][0]:.2f} ± {100 * r[k][1]:.2f}" for k in KEYS]
            lines.append(f"| {variant} | {r['seeds']} | " + " | ".join(cells) +
                         f" | {100 * r['hm'][0] / teacher:.0f} % | {100 * r['val'][0]:.1f} | "
                         f"{r['train_seconds'][0]:.0f} |")
        lines.append("")
    if teacher is not None:
        some = next(iter(next(iter(results["groups"].values())).values()))
        lines.append("Teacher zero-shot on the same split: " + ", ".join(
            f"{k} {100 * some['teacher_' + k][0]:.2f}" for k in KEYS) + ".")
    lines.append(f"{results['total_seconds']:.0f} s in all for the runs made in this invocation.")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    from pand.analysis.sweep import save_figure

    groups = [g for g in GROUP_NAMES if results["groups"].get(g)]
    fig = Figure(figsize=(4.2 * len(groups), 4.0))
    for i, group in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        variants = results["groups"][group]
        names = list(variants)
        xs = range(len(names))
        for j, key in enumerate(KEYS):
            ax.bar([x + (j - 1) * 0.27 for x in xs], [100 * variants[n][key][0] for n in names], width=0.27,
                   yerr=[100 * variants[n][key][1] for n in names], capsize=2, label=key)
        some = variants[names[0]]
        ax.axhline(100 * some["teacher_hm"][0], color="k", ls="--", lw=1, label="teacher HM")
        ax.axhline(90 * some["teacher_hm"][0], color="grey", ls=":", lw=1, label="90 % of teacher HM")
        ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(group)
        ax.grid(alpha=0.3, axis="y")
        if i == 0:
            ax.set_ylabel("test top-1 (%)")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Open-vocabulary ResNet-18 students, Fashion-MNIST base-to-novel (mean ± std over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from pand.io import atomic_write_json, atomic_write_text
    from pand.quickstart import parser

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/open_vocab_protocols")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--groups", default=",".join(GROUP_NAMES),
                   help="comma-separated, among: " + ", ".join(GROUP_NAMES))
    p.add_argument("--size-seeds", type=int, default=None, help="seeds of the size group (default: --seeds)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        p.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUP_NAMES)}")
    if any(g in groups for g in GROUP_NAMES[2:]) and "loss" not in groups:
        p.error("the groups with the chosen losses need the loss group, which chooses them")
    qs = parser().parse_args(["--out", args.out, "--unlabelled-epochs", str(UNLABELLED_EPOCHS)]
                             + (["--data-root", args.data_root] if args.data_root else []))
    out = Path(args.out)
    start = time.time()
    per_seed: dict[str, dict[str, list[dict[str, float]]]] = {}
    chosen: str | None = None
    # Group by group, seed by seed: a group is complete for every seed before the next starts, and the losses are
    # chosen (on val) from the whole loss group before the groups that use them.
    for group in [g for g in GROUP_NAMES if g in groups]:
        runs = group_runs(group, LOSSES[chosen] if chosen else ())
        per_seed[group] = {variant: [] for variant in runs}
        seeds = args.size_seeds if group == "size" and args.size_seeds is not None else args.seeds
        for seed in range(seeds):
            for variant, (unlabelled, overrides) in runs.items():
                summary = student_run(qs, seed, out / f"seed{seed}", unlabelled, overrides, f"{group} / {variant}")
                per_seed[group][variant].append(_row(summary))
                print(f"RESULT {group} / {variant} seed {seed}: " + json.dumps(
                    {k: round(100 * v, 2) for k, v in _row(summary).items() if k != "train_seconds"}), flush=True)
        if group == "loss":
            chosen = choose_losses(per_seed[group])
            print(f"CHOSEN on val: {chosen} ({' '.join(LOSSES[chosen]) or 'the defaults'})", flush=True)
    results = {"groups": aggregate(per_seed), "per_seed": per_seed, "seeds": args.seeds,
               "chosen_losses": None if chosen is None else {"variant": chosen, "overrides": list(LOSSES[chosen])},
               "total_seconds": time.time() - start}
    atomic_write_json(out / "results.json", results)
    text = report(results)
    atomic_write_text(out / "report.md", text)
    plot(results, out / "open_vocab_protocols.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
