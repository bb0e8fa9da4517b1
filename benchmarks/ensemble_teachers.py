"""Teacher ensembles on real images: two classifier teachers trained by pand, their ensemble, and KD students from
each teacher alone and from the ensemble, on Fashion-MNIST, on a CPU.

1. Two teachers: pand's CIFAR ResNet-20 trained with cross-entropy (``pand train method=ce``) on
   ``--teacher-per-class`` labelled images per class, with different seeds (initialisation, order and labelled pool:
   seeds 1001 and 1002).
2. Their ensemble (``teacher=ensemble``, the two best-on-val checkpoints as ``{kind: classifier, ckpt: ...}``
   members): its ``logits`` are the log of the two teachers' averaged softmax. Each teacher and the ensemble are
   tested on the first ``--test-images`` test images (the teachers' member logits and the ensemble's average come from
   one pass of the ensemble).
3. Students: a CIFAR ResNet-8 (78 k parameters) on ``--per-class`` labelled images per class (another seeded pool),
   ``--epochs`` epochs, AdamW with a cosine schedule, with ``ce`` (no teacher), ``kd`` from teacher A, from teacher B,
   from the ensemble's average (``method.members=mean``) and from each member (``method.members=each``); KD at
   pand's defaults (T 2, CE and KD weights 1). Each is tested once (best-on-val checkpoint) on the same test images;
   ``--seeds`` repeats step 3 with other pools and initialisations (mean and standard deviation over seeds).

    python benchmarks/ensemble_teachers.py --out runs/ensemble            # the default run (about 10 min, 2 cores)
    python benchmarks/ensemble_teachers.py --seeds 1 --epochs 5           # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STUDENT = ["student=cifar", "student.name=resnet8"]
TEACHER = ["student=cifar", "student.name=resnet20"]
TEACHER_SEEDS = (1001, 1002)
EVAL_BATCH = 250
#: The student rows of the table (their overrides: student_overrides).
ROWS = ("ce", "kd from teacher A", "kd from teacher B", "kd from the ensemble (mean)", "kd from each member (each)")


def compose_config(overrides: list[str]) -> dict[str, Any]:
    from pand.config import compose, to_plain

    return to_plain(compose("train", overrides))


def run(overrides: list[str]) -> dict[str, Any]:
    from pand.engine.run import train

    return train(compose_config(overrides))


def common(args: argparse.Namespace, per_class: int, seed: int, run_dir: Path, epochs: int) -> list[str]:
    out = [
        "data=fashion_mnist", f"data.samples_per_class={per_class}", "data.val_fraction=0.1",
        f"data.split_seed={seed}", f"seed={seed}", "data.num_workers=0", f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={EVAL_BATCH}", "trainer=cpu", f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim=adamw", f"optim.lr={args.lr}",
        "optim.weight_decay=0.05", "scheduler=cosine", f"run_dir={run_dir}",
        # the first --test-images test images, the ones the teachers are tested on
        f"trainer.limit_test_batches={math.ceil(args.test_images / EVAL_BATCH)}",
    ]
    if args.data_root:
        out.append(f"data.root={args.data_root}")
    return out


def ensemble_members(ckpts: list[Path]) -> str:
    return "teacher.members=[" + ",".join(f"{{kind: classifier, ckpt: {c}}}" for c in ckpts) + "]"


def teacher_accuracies(args: argparse.Namespace, ckpts: list[Path]) -> dict[str, float]:
    """Test top-1 of each teacher and of their ensemble on the first ``--test-images`` test images, from one pass of
    the ensemble (its member logits are each teacher's own, its logits their averaged softmax)."""
    import torch

    from pand.engine.data import PandDataModule
    from pand.teachers import LOGITS, MEMBER_LOGITS, LiveTeacherSource
    from pand.teachers.registry import load_teacher

    config = compose_config(common(args, args.per_class, 0, Path(args.out) / "unused", 1)
                            + ["teacher=ensemble", ensemble_members(ckpts), "method=kd"])
    data = PandDataModule(config["data"], seed=0)
    teacher = load_teacher(config, device="cpu", classes=data.classes)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    n = min(args.test_images, len(data.splits["test"]))
    right = torch.zeros(len(ckpts) + 1)
    with torch.no_grad():
        for batch in data.eval_dataloader("test", list(range(n))):
            out = source(batch, {LOGITS, MEMBER_LOGITS})
            guesses = [*out[MEMBER_LOGITS].unbind(1), out[LOGITS]]
            right += torch.tensor([float((g.argmax(-1) == batch["label"]).sum()) for g in guesses])
    acc = (right / n).tolist()
    return {"teacher A": acc[0], "teacher B": acc[1], "ensemble": acc[2], "test_images": n}


def student_overrides(row: str, ckpts: list[Path]) -> list[str]:
    if row == "ce":
        return ["method=ce"]
    if row.startswith("kd from teacher"):
        return ["method=kd", "teacher=classifier", f"teacher.ckpt={ckpts[0 if row.endswith('A') else 1]}"]
    mode = "each" if row.endswith("(each)") else "mean"
    return ["method=kd", f"method.members={mode}", "teacher=ensemble", ensemble_members(ckpts)]


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, Any]) -> str:
    t = results["teachers"]
    lines = [
        f"Teachers: CIFAR ResNet-20, cross-entropy, {results['teacher_per_class']} images per class, "
        f"{results['teacher_epochs']} epochs, seeds {list(TEACHER_SEEDS)} ({results['teacher_seconds']:.0f} s); "
        f"students: CIFAR ResNet-8, {results['per_class']} images per class, {results['epochs']} epochs, seeds "
        f"{results['seeds']}; test top-1 (%) on the first {t['test_images']} test images.",
        "",
        "| teacher | test top-1 (%) |",
        "|---|---:|",
        *(f"| {name} | {100 * t[name]:.2f} |" for name in ("teacher A", "teacher B", "ensemble")),
        "",
        "| student | test top-1 (%), mean ± std | s per run |",
        "|---|---:|---:|",
    ]
    for row in ROWS:
        runs = results["runs"].get(row, [])
        if runs:
            mean, std = summarise([100 * r["test_acc1"] for r in runs])
            secs = statistics.fmean(r["train_seconds"] for r in runs)
            lines.append(f"| {row} | {mean:.2f} ± {std:.2f} | {secs:.1f} |")
    lines += ["", f"Total wall time: {results['total_seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ensemble")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: pand's search)")
    p.add_argument("--teacher-per-class", type=int, default=300)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--test-images", type=int, default=5000, help="test on the first N of the 10,000 test images")
    p.add_argument("--rows", default=",".join(ROWS), help="student rows to run (comma-separated)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    start = time.time()
    ckpts, teacher_seconds = [], 0.0
    for name, seed in zip("AB", TEACHER_SEEDS):
        run_dir = out / f"teacher{name}"
        summary_file = run_dir / "summary.json"
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("status") == "done":
            summary = json.loads(summary_file.read_text())  # reuse a finished teacher
        else:
            summary = run(common(args, args.teacher_per_class, seed, run_dir, args.teacher_epochs)
                          + ["method=ce", *TEACHER, "test=false"])
        teacher_seconds += summary["train_seconds"]
        ckpts.append(run_dir / "checkpoints" / "best.ckpt")
        print(f"teacher {name}: {summary['train_seconds']:.0f} s", flush=True)
    teachers = teacher_accuracies(args, ckpts)
    print("teachers:", {k: round(100 * v, 2) if k != "test_images" else v for k, v in teachers.items()}, flush=True)
    results: dict[str, Any] = {
        "teachers": teachers, "teacher_seconds": teacher_seconds, "teacher_per_class": args.teacher_per_class,
        "teacher_epochs": args.teacher_epochs, "per_class": args.per_class, "epochs": args.epochs,
        "seeds": list(range(args.seeds)), "runs": {},
        "commands": {row: " ".join(student_overrides(row, ckpts)) for row in rows},
    }
    for seed in range(args.seeds):
        for row in rows:
            run_dir = out / f"seed{seed}" / row.replace(" ", "_").replace("(", "").replace(")", "")
            r = run(common(args, args.per_class, seed, run_dir, args.epochs) + STUDENT + student_overrides(row, ckpts))
            results["runs"].setdefault(row, []).append(
                {"seed": seed, "test_acc1": r["test_acc1"], "train_seconds": r["train_seconds"]})
            print(f"seed {seed} {row}: {100 * r['test_acc1']:.2f} % ({r['train_seconds']:.1f} s)", flush=True)
    results["total_seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
