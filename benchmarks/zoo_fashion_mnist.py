"""The distiller zoo on real images: a classifier teacher trained by pand, then CNN, ViT and MLP students with every
method, on Fashion-MNIST, on a CPU.

1. The teacher: pand's CIFAR ResNet-20 trained with cross-entropy on ``--teacher-per-class`` labelled images per
   class (``pand train method=ce``); its best-on-val checkpoint becomes ``teacher.ckpt`` of every student run.
2. Students see a smaller labelled pool (``--per-class`` images per class, another seeded draw) and are trained
   with each method for ``--epochs`` epochs, AdamW with a cosine schedule: a CIFAR ResNet-8 (CNN, 78 k parameters),
   pand's 32-px ViT with 4-px patches (depth 4, width 96) and pand's 32-px MLP-Mixer (4 blocks, width 96).
3. Every student is tested once (best-on-val checkpoint) on the first ``--test-fraction`` of the 10,000 test images
   (default half: testing all of them would cost as much as training here); ``--seeds`` repeats steps 2-3 with other
   pools and initialisations. The table gives mean and standard deviation of test top-1 over seeds.

Method settings are pand's defaults except where a short schedule needs adapting: DKD's warm-up is a quarter of the
epochs (its CIFAR default, 20 epochs, would keep it in warm-up throughout); ``ls`` is KD on z-scored logits with the
LS authors' pairing (T 2, KD weight 9, CE weight 0.1); PAT's region attention is 64 wide with 4 heads (its default,
512 wide, costs about 9x KD per step with networks this small). ``nrkd`` runs with ``--methods ...,nrkd``.

    python benchmarks/zoo_fashion_mnist.py --out runs/zoo            # the full comparison (about 15 min, 2 cores)
    python benchmarks/zoo_fashion_mnist.py --seeds 1 --students cnn --methods ce,kd   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STUDENTS = {
    "cnn": ["student=cifar", "student.name=resnet8"],
    "vit": ["student=timm", "student.name=pand_vit_p4_32", "student.pretrained=false", "+student.kwargs.depth=4",
            "+student.kwargs.embed_dim=96", "+student.kwargs.num_heads=3"],
    "mlp": ["student=timm", "student.name=pand_mixer_p4_32", "student.pretrained=false",
            "+student.kwargs.num_blocks=4", "+student.kwargs.embed_dim=96"],
}


def method_overrides(method: str, epochs: int) -> list[str]:
    if method == "ls":
        return ["method=kd", "method.standardize=true", "method.temperature=2.0", "method.kd_weight=9.0",
                "method.ce_weight=0.1"]
    if method == "dkd":
        return ["method=dkd", f"method.warmup_epochs={max(1, epochs // 4)}"]
    if method == "pat":
        return ["method=pat", "method.embed_dim=64", "method.num_heads=4"]
    return [f"method={method}"]


def run(overrides: list[str]) -> dict[str, Any]:
    from pand.config import compose, to_plain
    from pand.engine.run import train

    return train(to_plain(compose("train", overrides)))


def common(args: argparse.Namespace, per_class: int, seed: int, run_dir: Path, epochs: int) -> list[str]:
    out = [
        "data=fashion_mnist", f"data.samples_per_class={per_class}", "data.val_fraction=0.1",
        f"data.split_seed={seed}", f"seed={seed}", "data.num_workers=0", f"data.batch_size={args.batch_size}",
        "trainer=cpu", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "optim=adamw", f"optim.lr={args.lr}", "optim.weight_decay=0.05",
        "scheduler=cosine", f"run_dir={run_dir}",
    ]
    if args.test_fraction < 1:
        out.append(f"trainer.limit_test_batches={args.test_fraction}")
    if args.data_root:
        out.append(f"data.root={args.data_root}")
    return out


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, Any], students: list[str], methods: list[str]) -> str:
    seeds = results["seeds"]
    lines = [
        f"Teacher: CIFAR ResNet-20 trained by pand on {results['teacher_per_class']} images per class: "
        f"{100 * results['teacher']['test_acc1']:.2f} % test top-1 ({results['teacher']['train_seconds']:.0f} s).",
        f"Students: {results['per_class']} labelled images per class, {results['epochs']} epochs, "
        f"seeds {seeds}; test top-1 (%) on {results['test_images']} test images, mean ± std over seeds; seconds of "
        "training per run.",
        "",
        "| method | " + " | ".join(f"{s} top-1 | {s} s" for s in students) + " |",
        "|---|" + "---:|---:|" * len(students),
    ]
    for m in methods:
        cells = []
        for s in students:
            runs = results["runs"].get(f"{s}/{m}", [])
            if not runs:
                cells += ["-", "-"]
                continue
            mean, std = summarise([100 * r["test_acc1"] for r in runs])
            secs = statistics.fmean(r["train_seconds"] for r in runs)
            cells += [f"{mean:.2f} ± {std:.2f}", f"{secs:.1f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Total wall time: {results['total_seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/zoo")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: pand's search)")
    p.add_argument("--teacher-per-class", type=int, default=400)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of the 10,000 test images each student is tested on (default: the first 5,000)")
    p.add_argument("--students", default="cnn,vit,mlp")
    p.add_argument("--methods", default="ce,kd,dkd,ls,ofa,pat", help="any of ce,kd,dkd,ls,ofa,nrkd,pat")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    students, methods = args.students.split(","), args.methods.split(",")
    start = time.time()
    teacher_dir = out / "teacher"
    ckpt = teacher_dir / "checkpoints" / "best.ckpt"
    summary_file = teacher_dir / "summary.json"
    if summary_file.is_file() and json.loads(summary_file.read_text()).get("status") == "done":
        teacher = json.loads(summary_file.read_text())  # reuse a finished teacher
    else:
        teacher = run(common(args, args.teacher_per_class, 1000, teacher_dir, args.teacher_epochs)
                      + ["method=ce", "student=cifar", "student.name=resnet20"])
    print(f"teacher: test top-1 {100 * teacher['test_acc1']:.2f} % in {teacher['train_seconds']:.0f} s", flush=True)
    results: dict[str, Any] = {
        "teacher": teacher, "teacher_per_class": args.teacher_per_class, "per_class": args.per_class,
        "epochs": args.epochs, "seeds": list(range(args.seeds)), "runs": {},
        "test_images": round(10000 * min(args.test_fraction, 1.0)),
    }
    for seed in range(args.seeds):
        for s in students:
            for m in methods:
                run_dir = out / f"seed{seed}" / s / m
                extra = STUDENTS[s] + method_overrides(m, args.epochs)
                if m != "ce":
                    extra += ["teacher=classifier", f"teacher.ckpt={ckpt}"]
                r = run(common(args, args.per_class, seed, run_dir, args.epochs) + extra)
                results["runs"].setdefault(f"{s}/{m}", []).append(
                    {"seed": seed, "test_acc1": r["test_acc1"], "train_seconds": r["train_seconds"]})
                print(f"seed {seed} {s:>3} {m:>4}: {100 * r['test_acc1']:.2f} % ({r['train_seconds']:.1f} s)",
                      flush=True)
    results["total_seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results, students, methods)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
