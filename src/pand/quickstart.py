"""``pand quickstart``: the whole PAND pipeline on real images, offline, on a CPU, in minutes.

Fashion-MNIST stands in for a fine-grained dataset and a compact CLIP fitted by pand on its training images
(``teacher=fmnist_clip``, see ``pand teacher fit``) stands in for a large pretrained teacher. The student sees only a
small labelled pool (``--per-class`` images per class, val carved from it); the teacher and the student are compared
on the 10,000 test images:

1. teacher zero-shot with the hand-written template;
2. stage 1: CoOp prompts learned on the teacher's stored features of the labelled pool (selected on val);
3. students trained with ``ce`` (no teacher), ``kd``, ``vl2lite`` and ``pand`` (learned prompts + NLRD);
4. the teacher-driven students again with unlabelled training images added (``data.unlabelled=rest``: ``--unlabelled``
   Fashion-MNIST training images outside the labelled pool, their labels never read), an epoch being one pass over
   them with the labelled pool cycled in every batch;
5. every student evaluated once on the test split (best-on-val checkpoint);
6. an open-vocabulary student (``method=openvocab``) trained on the labelled images of 5 of the 10 classes
   (``data.class_split=base_novel``) and tested on the 5 seen and the 5 unseen classes, next to the teacher's own
   zero-shot classifier on the same splits (base / novel top-1, their harmonic mean, text -> image retrieval mAP);
   with ``--protocols``, again with the ``--unlabelled`` images under each protocol (``data.novel_protocol``):
   ``strict`` (unlabelled images of the 5 seen classes only), ``transductive`` (of all 10 classes, labels and unseen
   names never read), and label-free (``data.samples_per_class=0``: no labelled image, val labelled by the teacher).

The student runs are independent once stage 1 is done, so they run side by side (``--jobs``, one process per core by
default, see :mod:`pand.jobs`), each writing its output to ``<out>/seed<N>/<run>.log``; a line per finished
run gives the time left, and the report ends with the time of each phase. The first seed's labelled-only runs also
embed their test features for the t-SNE plot (``--tsne-samples`` images) before they end, so that the plot takes no
phase of its own.

``--seeds N`` repeats everything with N labelled pools / initialisations and reports mean and standard deviation.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pand.analysis.sweep import save_figure
from pand.arguments import ArgumentParser
from pand.errors import PandError
from pand.io import atomic_write_json, atomic_write_text
from pand.jobs import MAX_WORKERS, Job, available_cores, default_workers, format_seconds, run_jobs

METHODS = ("ce", "kd", "vl2lite", "pand")
#: The methods run again with unlabelled images (ce has no teacher term that could use them).
UNLABELLED_METHODS = ("kd", "vl2lite", "pand")
UNLABELLED_SUFFIX = "+unlabelled"
OPEN_VOCAB = "openvocab"
OPEN_VOCAB_KEYS = ("base", "novel", "hm")
#: The open-vocabulary runs with ``--unlabelled`` images: row name -> the overrides that make it.
OPEN_VOCAB_PROTOCOLS = {
    "strict": ("data.novel_protocol=strict",),
    "transductive": ("data.novel_protocol=transductive",),
    "label-free": ("data.samples_per_class=0",),
}
TEACHER_KEYS = ("teacher_zero_shot", "teacher_coop")
#: Test images per batch of a student's evaluation: no gradients are kept, and a CPU convolves 256 small images
#: about twice as fast per image as 32 (``pand bench`` measures it).
EVAL_BATCH_SIZE = 256


def _data_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    out = [
        "data=fashion_mnist",
        f"data.samples_per_class={args.per_class}",
        f"data.val_fraction={args.val_fraction}",
        f"data.split_seed={seed}",
        f"teacher={args.teacher}",
        f"seed={seed}",
    ]
    if args.data_root:
        out.append(f"data.root={args.data_root}")
    if args.download:
        out.append("data.download=true")
    return out


def run_stage1(args: argparse.Namespace, seed: int, seed_dir: Path) -> dict[str, Any]:
    from pand.config import compose, to_plain
    from pand.stage1.run import run_prompts

    overrides = _data_overrides(args, seed) + [
        f"features.dir={seed_dir / 'features'}",
        "features.num_workers=0",
        f"prompts.epochs={args.coop_epochs}",
        f"prompts.ctx_init={args.ctx_init}",
        f"prompts.out={seed_dir / 'learned_text_features.safetensors'}",
    ]
    return run_prompts(to_plain(compose("train", overrides)))


def run_student(args: argparse.Namespace, seed: int, seed_dir: Path, method: str, prompts: Path,
                unlabelled: int | None = None, run_name: str | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One student run; with ``unlabelled``, that many training images outside the labelled pool are added
    (``data.unlabelled=rest``) and the run uses the unlabelled schedule (``--unlabelled-epochs`` over them).
    ``extra``: overrides of this run only, before the user's."""
    from pand.config import compose, to_plain
    from pand.engine.run import train

    overrides = _data_overrides(args, seed) + [
        f"method={method}",
        "student=resnet18",
        "student.pretrained=false",
        "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        f"trainer.enable_progress_bar={str(sys.stderr.isatty()).lower()}",
        "data.num_workers=0",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={EVAL_BATCH_SIZE}",
        "optim.lr=1e-3",
        "scheduler=cosine",
        f"run_dir={seed_dir / (run_name or method)}",
    ]
    if unlabelled:
        overrides += ["data.unlabelled=rest", f"data.unlabelled_limit={unlabelled}",
                      f"trainer.max_epochs={args.unlabelled_epochs}", f"data.batch_size={args.unlabelled_batch_size}",
                      "trainer.log_every_n_steps=10"]
    user = list(args.overrides)
    if method == "pand":
        overrides.append(f"teacher.text_features={prompts}")
    if method == OPEN_VOCAB:
        # The same class halves for every seed, so that seeds vary the labelled pool and the initialisation only.
        overrides += ["data.class_split=base_novel", "data.class_split_seed=0"]
    if method == "ce":  # the teacher cache is refused for a method that reads no teacher outputs
        user = [o for o in user if not o.lstrip("+~").startswith("cache.")]
    return train(to_plain(compose("train", overrides + list(extra) + user)))


def run_student_and_embed(args: argparse.Namespace, seed: int, seed_dir: Path, method: str, prompts: Path,
                          unlabelled: int | None, run_name: str, extra: tuple[str, ...]) -> dict[str, Any]:
    """:func:`run_student`, then the t-SNE of its best checkpoint's test features (``--tsne-samples`` images) saved
    beside it, in the same process: the embeddings of the figure are computed while other runs still train."""
    from pand.analysis.tsne import embed_checkpoint

    summary = run_student(args, seed, seed_dir, method, prompts, unlabelled, run_name, extra)
    start = time.time()
    run_dir = Path(summary["run_dir"])
    embedding = embed_checkpoint(run_dir / "checkpoints" / "best.ckpt", method, "test", seed=seed,
                                 max_samples=args.tsne_samples)
    return {**summary, TSNE_FILE: str(embedding.save(run_dir / TSNE_FILE)), "tsne_seconds": time.time() - start}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def learning_curves(run_dirs: dict[str, Path], out: Path) -> Path:
    """Validation top-1 per epoch of each method (first seed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for method, run in run_dirs.items():
        points = {}
        with (run / "metrics.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/acc1"):
                    points[int(float(row["epoch"]))] = 100 * float(row["val/acc1"])
        if points:
            xs = sorted(points)
            ax.plot([x + 1 for x in xs], [points[x] for x in xs], marker=".", label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Students on the labelled pool: validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def report(results: dict[str, Any], out_dir: Path) -> str:
    seeds = results["seeds"]
    lines = [
        "# pand quickstart",
        "",
        f"Fashion-MNIST, {results['per_class']} labelled images per class for the student (val carved from them), "
        f"teacher `{results['teacher']}`, student ResNet-18 from scratch, {results['epochs']} epochs, "
        f"{len(seeds)} seed(s) {seeds}. Test top-1 on the 10,000 test images"
        + (" (mean ± standard deviation over seeds)." if len(seeds) > 1 else "."),
        "",
        *([f"The `{UNLABELLED_SUFFIX}` columns add {results['unlabelled']:,} unlabelled training images (outside the "
           f"labelled pool; their labels are never read) for {results['unlabelled_epochs']} epochs over them, in "
           f"batches of {results['unlabelled_batch_size']} of which a quarter come from the labelled pool "
           "(`data.labelled_fraction=0.25`).", ""] if results.get("unlabelled") else []),
        f"| method | test top-1 (%) | train time (s) | test top-1 {UNLABELLED_SUFFIX} (%) | train time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in (*TEACHER_KEYS, *METHODS):
        lines.append(f"| {key} | " + " | ".join(_cells(results, key)) + " |")
    if results.get(OPEN_VOCAB):
        ov = results[OPEN_VOCAB]
        lines += [
            "",
            (f"Open vocabulary (`method=openvocab`, base-to-novel): the student trains on the labelled images of "
             f"{len(ov['base_classes'])} classes ({', '.join(ov['base_classes'])}) and never sees an image of the "
             f"other {len(ov['novel_classes'])} ({', '.join(ov['novel_classes'])}); it classifies them through the "
             "teacher's text embeddings of their names. Top-1 on base test images among the base classes, on novel "
             "ones among the novel classes, their harmonic mean, and text -> image retrieval mAP over all test "
             "images. (The shipped teacher was fitted on all ten classes, so its novel figure is not zero-shot for "
             "the teacher itself.)"),
            "",
            "| model | base (%) | novel (%) | HM (%) | retrieval mAP (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, cells in _open_vocab_rows(results):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if results.get(f"{OPEN_VOCAB}_protocols"):
            lines += ["", (f"The student rows with a protocol add {results['unlabelled']:,} unlabelled training images: "
                           "`strict` only of the seen classes, `transductive` of all ten (their labels and the unseen "
                           "names never read; a transductive result is not comparable with inductive ones), "
                           "`label-free` with no labelled image at all (val labelled by the teacher), each under the "
                           "unlabelled schedule above.")]
    lines += ["", "Where the time went (wall clock):", "", "| phase | time |", "|---|---:|"]
    lines += [f"| {name} | {format_seconds(secs)} |" for name, secs in (results.get("phase_seconds") or {}).items()]
    lines += ["", f"Total time: {results['total_seconds']:.0f} s.", ""]
    for name in ("learning_curves.png", "tsne_compare.png"):
        if (out_dir / name).is_file():
            lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


def _cells(results: dict[str, Any], key: str) -> list[str]:
    """Test top-1 and train time of ``key``, labelled only and with unlabelled images ("-" where not run)."""
    n = len(results["seeds"])
    out = []
    for k in (key, key + UNLABELLED_SUFFIX):
        r = results.get(k)
        if r is None:
            out += ["-", "-"]
            continue
        out.append(_pm(r["test_acc"], r["test_acc_std"], n))
        out.append(f"{r['train_seconds']:.1f}" if r.get("train_seconds") is not None else "-")
    return out


def _pm(mean: float, std: float | None, n_seeds: int) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n_seeds > 1 and std is not None else "")


def _open_vocab_rows(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(row name, base / novel / HM / mAP cells) of the open-vocabulary table: the student labelled only, under each
    protocol with unlabelled images, then the teacher."""
    n = len(results["seeds"])
    ov = results[OPEN_VOCAB]
    named = [("student", ov["student"])]
    named += [(f"student, {p}", s["student"]) for p, s in (results.get(f"{OPEN_VOCAB}_protocols") or {}).items()]
    named.append(("teacher", ov["teacher"]))
    return [(name, [_pm(r[k], r.get(k + "_std"), n) for k in (*OPEN_VOCAB_KEYS, "mAP")]) for name, r in named]


def _open_vocab_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of base / novel / HM top-1 and retrieval mAP, student and teacher."""
    out: dict[str, Any] = {"base_classes": runs[0]["class_split"]["base"],
                           "novel_classes": runs[0]["class_split"]["novel"], "per_seed": runs}
    for who in ("student", "teacher"):
        values = {k: [r[who][k] for r in runs] for k in OPEN_VOCAB_KEYS}
        values["mAP"] = [r[who]["retrieval"]["mAP"] for r in runs]
        out[who] = {}
        for k, v in values.items():
            out[who][k], out[who][k + "_std"] = _mean_std(v)
    return out


#: Fashion-MNIST's test images, which every student run scores once (for the cost estimate only).
_TEST_IMAGES = 10_000
#: A t-SNE of N images costs about as much as 3 N image passes on one core (2,000 images: about 8 s).
_TSNE_COST_PER_IMAGE = 3
#: The t-SNE embedding of a run's test features, in its run folder.
TSNE_FILE = "tsne_test.npz"


def _expected_cost(args: argparse.Namespace, unlabelled: int | None) -> float:
    """A run's cost in image passes, for the order of the parallel runs and the time-left estimate: a training image
    costs about three passes (forward, backward), a test image one."""
    labelled = args.per_class * 10 * (1 - args.val_fraction)
    if unlabelled:
        # an epoch is one pass over the unlabelled images, a quarter of each batch drawn from the labelled pool
        trained = args.unlabelled_epochs * unlabelled * 4 / 3
    else:
        trained = args.epochs * labelled
    return 3 * trained + _TEST_IMAGES


def student_jobs(args: argparse.Namespace, seed: int, seed_dir: Path, prompts: Path) -> list[Job]:
    """The seed's independent student runs, each with the key of its row in the results."""
    plan: list[tuple[str, str, int | None, tuple[str, ...]]] = [(m, m, None, ()) for m in METHODS]
    if args.unlabelled:
        plan += [(m + UNLABELLED_SUFFIX, m, args.unlabelled, ()) for m in UNLABELLED_METHODS]
    if not args.no_open_vocab:
        plan.append((OPEN_VOCAB, OPEN_VOCAB, None, ()))
        if args.unlabelled and args.protocols:
            plan += [(f"{OPEN_VOCAB}+{p}", OPEN_VOCAB, args.unlabelled, extra)
                     for p, extra in OPEN_VOCAB_PROTOCOLS.items()]
    jobs = []
    for key, method, unlabelled, extra in plan:
        # The first seed's labelled students are drawn in the t-SNE figure: their runs embed their own features.
        embeds = not args.no_tsne and seed == args.seed and key in METHODS
        jobs.append(Job(name=f"seed {seed} {key}", fn=run_student_and_embed if embeds else run_student,
                        args=(args, seed, seed_dir, method, prompts, unlabelled, key, extra),
                        weight=_expected_cost(args, unlabelled) + (_TSNE_COST_PER_IMAGE * args.tsne_samples if embeds
                                                                   else 0),
                        log=seed_dir / f"{key}.log", info={"seed": seed, "key": key}))
    return jobs


def _describe(job: Job, summary: dict[str, Any]) -> str:
    if "open_vocab" in summary and "hm" in summary["open_vocab"].get("student", {}):
        return f"HM {100 * summary['open_vocab']['student']['hm']:.2f} %"
    return f"test top-1 {100 * summary['test_acc1']:.2f} %" if summary.get("test_acc1") is not None else ""


def quickstart(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    out_dir = Path(args.out)
    seeds = list(range(args.seed, args.seed + args.seeds))
    with_unlabelled = [m + UNLABELLED_SUFFIX for m in UNLABELLED_METHODS] if args.unlabelled else []
    per_seed: dict[str, list[dict[str, Any]]] = {k: [] for k in (*TEACHER_KEYS, *METHODS, *with_unlabelled)}
    first_runs: dict[str, Path] = {}
    open_vocab_runs: list[dict[str, Any]] = []
    protocol_runs: dict[str, list[dict[str, Any]]] = {}
    phases: dict[str, float] = {}
    jobs: list[Job] = []
    t0 = time.time()
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        print(f"== seed {seed}: teacher zero-shot and stage 1 (CoOp on stored teacher features)", flush=True)
        t_seed = time.time()
        stage1 = run_stage1(args, seed, seed_dir)
        per_seed["teacher_zero_shot"].append({"test_acc": stage1["zero_shot_test_acc"], "val_acc": stage1["zero_shot_val_acc"]})
        per_seed["teacher_coop"].append(
            {"test_acc": stage1["coop_test_acc"], "val_acc": stage1["coop_val_acc"], "train_seconds": time.time() - t_seed}
        )
        jobs += student_jobs(args, seed, seed_dir, Path(stage1["text_features"]))
    phases["teacher features and CoOp (stage 1)"] = time.time() - t0
    workers = default_workers(len(jobs)) if args.jobs in (None, 0) else args.jobs
    where = (f"{workers} at a time, one thread each" if workers > 1 and available_cores() // workers == 1 else
             f"{workers} at a time" if workers > 1 else "one after the other")
    print(f"== {len(jobs)} student runs, {where} (each run's output: <out>/seed<N>/<run>.log)", flush=True)
    t0 = time.time()
    done = run_jobs(jobs, workers, describe=_describe, printer=lambda line: print(line, flush=True))
    phases[f"students ({len(jobs)} runs, {where})"] = time.time() - t0
    runs: dict[str, dict[str, Any]] = {}
    tsne_files: dict[str, Path] = {}
    for d in done:
        key, seed, summary = d.job.info["key"], d.job.info["seed"], d.result
        runs[f"seed{seed}/{key}"] = {"train_seconds": summary["train_seconds"], "eval_seconds":
                     round(summary["total_seconds"] - summary["train_seconds"], 2), "wall_seconds": round(d.seconds, 2)}
        if key.startswith(OPEN_VOCAB):
            row = {**summary["open_vocab"], "train_seconds": summary["train_seconds"]}
            if key == OPEN_VOCAB:
                open_vocab_runs.append(row)
            else:
                protocol_runs.setdefault(key.split("+", 1)[1], []).append(row)
            continue
        per_seed[key].append(
            {"test_acc": summary["test_acc1"], "val_acc": summary["val_acc1"], "train_seconds": summary["train_seconds"]}
        )
        if seed == seeds[0] and key in METHODS:
            first_runs[key] = Path(summary["run_dir"])
            if TSNE_FILE in summary:
                tsne_files[key] = Path(summary[TSNE_FILE])
                runs[f"seed{seed}/{key}"]["tsne_seconds"] = round(summary["tsne_seconds"], 2)
    methods = {}
    for key, runs_of_key in per_seed.items():
        mean, std = _mean_std([r["test_acc"] for r in runs_of_key])
        secs = [r["train_seconds"] for r in runs_of_key if r.get("train_seconds") is not None]
        methods[key] = {
            "test_acc": mean,
            "test_acc_std": std,
            "val_acc": statistics.fmean(r["val_acc"] for r in runs_of_key),
            "train_seconds": statistics.fmean(secs) if secs else None,
            "per_seed": runs_of_key,
        }
    t0 = time.time()
    learning_curves(first_runs, out_dir / "learning_curves.png")
    phases["learning curves"] = time.time() - t0
    if tsne_files:
        from pand.analysis.tsne import Embedding, plot_embeddings

        t0 = time.time()
        plot_embeddings([Embedding.load(tsne_files[m]) for m in METHODS], out_dir)
        phases["t-SNE figures (embedded in the runs)"] = time.time() - t0
    results = {
        "seeds": seeds,
        "per_class": args.per_class,
        "epochs": args.epochs,
        "teacher": args.teacher,
        "unlabelled": args.unlabelled,
        "unlabelled_epochs": args.unlabelled_epochs,
        "unlabelled_batch_size": args.unlabelled_batch_size,
        **methods,
        OPEN_VOCAB: _open_vocab_summary(open_vocab_runs) if open_vocab_runs else None,
        f"{OPEN_VOCAB}_protocols": {p: _open_vocab_summary(r) for p, r in protocol_runs.items()},
        "workers": workers,
        "phase_seconds": {name: round(secs, 1) for name, secs in phases.items()},
        "run_seconds": runs,
        "total_seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "report.md", report(results, out_dir))
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pand quickstart: test top-1 on Fashion-MNIST ({len(results['seeds'])} seed(s))")
    table.add_column("method")
    table.add_column("test top-1 (%)", justify="right")
    table.add_column("train time (s)", justify="right")
    table.add_column(f"{UNLABELLED_SUFFIX} top-1 (%)", justify="right")
    table.add_column("train time (s)", justify="right")
    for key in (*TEACHER_KEYS, *METHODS):
        table.add_row(key, *_cells(results, key))
    console = Console()
    console.print(table)
    ov = results.get(OPEN_VOCAB)
    if ov:
        t = Table(title=f"open vocabulary: trained on {len(ov['base_classes'])} classes, tested on "
                        f"{len(ov['novel_classes'])} unseen ones too (top-1 %, retrieval mAP %)")
        for col in ("model", "base", "novel", "HM", "mAP"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name, cells in _open_vocab_rows(results):
            t.add_row(name, *cells)
        console.print(t)
    phases = ", ".join(f"{name} {format_seconds(secs)}" for name, secs in (results.get("phase_seconds") or {}).items())
    console.print(f"total time: {results['total_seconds']:.0f} s ({phases})")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pand quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (labelled pools and initialisations)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--per-class", type=int, default=20, help="labelled images per class the student may use")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the labelled pool held out for val")
    p.add_argument("--epochs", type=int, default=30, help="student training epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unlabelled", type=int, default=5000,
                   help="unlabelled training images added in the second run of kd, vl2lite and pand (0: skip them)")
    p.add_argument("--unlabelled-epochs", type=int, default=3,
                   help="epochs over the unlabelled images (3: within every row's seed spread of 5, in 60 %% of the "
                        "time)")
    p.add_argument("--unlabelled-batch-size", type=int, default=128,
                   help="batch size of the runs with unlabelled images (a quarter from the labelled pool)")
    p.add_argument("--coop-epochs", type=int, default=50, help="stage-1 CoOp epochs")
    p.add_argument("--ctx-init", default="'a photo of a'", help="CoOp context initialisation (a phrase, or null)")
    p.add_argument("--teacher", default="fmnist_clip", help="teacher config (default: the shipped fmnist_clip)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: data/ or Debian's package path)")
    p.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST (checksum-verified) if it is neither under data/ nor installed by Debian")
    p.add_argument("--tsne-samples", type=int, default=1000,
                   help="test images in the t-SNE plot (the same seeded ones for every student)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plot")
    p.add_argument("--no-open-vocab", action="store_true", help="skip the open-vocabulary (base-to-novel) student")
    p.add_argument("--jobs", type=int, default=0,
                   help="student runs side by side, each in its own process (default 0: one per CPU core, at most "
                        f"{MAX_WORKERS}; 1: one after the other in this process)")
    p.add_argument("--protocols", action="store_true",
                   help="also train the open-vocabulary student with the --unlabelled images under each protocol "
                        "(strict, transductive, label-free): three more runs of the size of the unlabelled ones")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the student runs (e.g. trainer.max_epochs=5)")
    return p


def main_quickstart(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.jobs < 0:
        p.error(f"--jobs={args.jobs} is not allowed: expected 0 (one run per core) or a number of runs >= 1")
    try:
        results = quickstart(args)
    except PandError as err:
        print(f"pand quickstart: error: {err}", file=sys.stderr)
        return 2
    print_table(results)
    print(f"results: {Path(args.out) / 'results.json'}, report: {Path(args.out) / 'report.md'}")
    return 0
