"""int8 students, side by side: test top-1 of float32, post-training int8 (PTQ) and quantization-aware distilled int8
(QAT), and the latency of each on this CPU.

The students are the quickstart's teacher-driven ones with unlabelled images (``method=kd``, 20 labelled
Fashion-MNIST images per class, 5,000 unlabelled ones, 3 epochs, the shipped ``fmnist_clip`` teacher), as ResNet-18
and as MobileNetV2, for every seed. Per student and seed:

1. the float run (the quickstart's ``kd+unlabelled`` settings, with ``student=...``);
2. ``pand export format=onnx quantize=int8`` of its best checkpoint: the float ONNX model and the PTQ int8 one;
3. a quantization-aware fine-tune from that checkpoint, distilled from the same teacher on the same images
   (``quantize=qat init_from=...``, ``--qat-epochs`` epochs at ``--qat-lr``, BatchNorm frozen in the last
   epoch), exported the same way: the QAT int8 model; and the same fine-tune in float (``init_from=...`` alone), the
   control that tells what the extra epoch gives without quantization;
4. ``pand eval model=...`` of each ONNX file on the 10,000 test images: the numbers that ship.

Then, with nothing else running, the latency of the seed-0 models at batch 1 and 32: PyTorch eager (float32) against
ONNX Runtime float32 and int8, each with the same threads (``--threads``: one, then every core), median over
``--repeats`` batches, round-robin (:func:`pand.bench.exported.time_models`).

    python benchmarks/int8_students.py --out runs/int8 --seeds 3
    python benchmarks/int8_students.py --out runs/int8 --latency-only      # time the same files again
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STUDENTS = ("resnet18", "mobilenet_v2")
METHOD = "kd"


def _quickstart_args(out: Path) -> argparse.Namespace:
    from pand.quickstart import parser

    return parser().parse_args(["--out", str(out)])


def run_one(out: str, seed: int, student: str, qat_epochs: int, qat_lr: float, calibration: int) -> dict[str, Any]:
    """Float run, its PTQ export, the QAT fine-tune and its export, and the test top-1 of the three ONNX models."""
    from pand.engine.run import evaluate_exported
    from pand.export import export_student
    from pand.quickstart import run_student

    args = _quickstart_args(Path(out))
    seed_dir = Path(out) / f"seed{seed}"
    student_args = (f"student={student}", "student.pretrained=false")
    unlabelled = args.unlabelled
    started = time.time()
    float_run = run_student(args, seed, seed_dir, METHOD, Path("unused"), unlabelled, f"{student}-float", student_args)
    float_seconds = time.time() - started
    best = Path(float_run["best_checkpoint"])
    ptq = export_student(best, "onnx", seed_dir / f"{student}-ptq", quantize="int8", calibration=calibration)
    started = time.time()
    tune = (f"init_from={best}", f"trainer.max_epochs={qat_epochs}", f"optim.lr={qat_lr}")
    qat_run = run_student(args, seed, seed_dir, METHOD, Path("unused"), unlabelled, f"{student}-qat",
                          student_args + tune + ("quantize=qat", "quantize.export=false"))
    qat_seconds = time.time() - started
    # the same fine-tune in float: what the extra epoch gives without quantization, so that the QAT row's gain or loss
    # is the quantization's, not the extra training's
    control = run_student(args, seed, seed_dir, METHOD, Path("unused"), unlabelled, f"{student}-float-tuned",
                          student_args + tune)
    qat = export_student(qat_run["best_checkpoint"], "onnx", seed_dir / f"{student}-qat-int8", quantize="int8",
                         calibration=calibration)
    folder = Path(ptq["files"][0]).parent
    scores = {
        "float32 (PyTorch checkpoint)": float_run["test_acc1"],
        "float32 (ONNX)": evaluate_exported(folder / "student.onnx", splits=("test",))["test_acc1"],
        "int8 PTQ": evaluate_exported(folder / "student.int8.onnx", splits=("test",))["test_acc1"],
        "float32 fine-tuned like QAT (control)": control["test_acc1"],
        "int8 QAT (simulated in PyTorch)": qat_run["test_acc1"],
        "int8 QAT": evaluate_exported(Path(qat["files"][0]), splits=("test",))["test_acc1"],
    }
    return {"seed": seed, "student": student, "test_acc1": scores, "float_seconds": round(float_seconds, 1),
            "qat_seconds": round(qat_seconds, 1), "ptq": ptq["student"]["quantization"],
            "qat": qat["student"]["quantization"], "files": {"float_checkpoint": str(best),
                                                              "float_onnx": str(folder / "student.onnx"),
                                                              "ptq_onnx": str(folder / "student.int8.onnx"),
                                                              "qat_onnx": qat["files"][0]}}


def latency(files: dict[str, str], threads: int, batches: tuple[int, ...], repeats: int) -> dict[str, Any]:
    from pand.bench.exported import time_models
    from pand.bench.measure import _cpu_name
    from pand.deploy import load_student

    loaded = load_student(files["float_checkpoint"])
    result = time_models(loaded.model, {"ONNX Runtime float32": files["float_onnx"],
                                        "ONNX Runtime int8 (PTQ)": files["ptq_onnx"],
                                        "ONNX Runtime int8 (QAT)": files["qat_onnx"]},
                         int(loaded.config["data"]["image_size"]), threads=threads, batches=batches, repeats=repeats)
    return {**result, "cpu": _cpu_name()}


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(results: dict[str, Any]) -> str:
    lines = [f"# int8 students: {results['seeds']} seeds, kd with {results['unlabelled']:,} unlabelled images", "",
             "Test top-1 (%) on Fashion-MNIST's 10,000 test images, mean ± std over seeds:", ""]
    rows = list(results["runs"][0]["test_acc1"])
    lines += ["| model | " + " | ".join(results["students"]) + " |", "|---|" + "---:|" * len(results["students"])]
    for row in rows:
        cells = [_mean_std([r["test_acc1"][row] for r in results["runs"] if r["student"] == s])
                 for s in results["students"]]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for name, row in (("PTQ int8", "int8 PTQ"), ("QAT int8", "int8 QAT")):
        drop = {s: [r["test_acc1"]["float32 (ONNX)"] - r["test_acc1"][row] for r in results["runs"]
                    if r["student"] == s] for s in results["students"]}
        lines += ["", f"float32 minus {name} (points): " + ", ".join(f"{s} {_mean_std(d)}" for s, d in drop.items())]
    for student, lat in results.get("latency", {}).items():
        lines += ["", f"Latency of {student} ({lat['cpu']}; median of {lat['repeats']} "
                      f"batches; instruction sets: {', '.join(lat['isa']) or 'none of note'}):", "",
                  "| model | MB on disk | " + " | ".join(f"ms, batch {b}" for b in lat["batches"])
                  + " | " + " | ".join(f"vs PyTorch, batch {b}" for b in lat["batches"]) + " |",
                  "|---|---:|" + "---:|" * (2 * len(lat["batches"]))]
        for name, m in lat["models"].items():
            lines.append(f"| {name} | {m['megabytes']:.2f} | " + " | ".join(f"{m['ms'][str(b)]:.3f}"
                                                                            for b in lat["batches"])
                         + " | " + " | ".join(f"{m['speedup'][str(b)]:.2f}x" for b in lat["batches"]) + " |")
    return "\n".join(lines) + "\n"


def train_and_score(args: argparse.Namespace, out: Path, students: tuple[str, ...]) -> dict[str, Any]:
    from pand.jobs import Job, default_workers, run_jobs

    jobs = [Job(name=f"seed {seed} {student}", fn=run_one,
                args=(str(out), seed, student, args.qat_epochs, args.qat_lr, args.calibration),
                log=out / f"seed{seed}" / f"{student}.log") for seed in range(args.seeds) for student in students]
    workers = default_workers(len(jobs)) if not args.jobs else args.jobs
    started = time.time()
    done = run_jobs(jobs, workers, describe=lambda job, r: "QAT int8 {:.2f} %, float {:.2f} %".format(
        100 * r["test_acc1"]["int8 QAT"], 100 * r["test_acc1"]["float32 (ONNX)"]),
        printer=lambda line: print(line, flush=True))
    runs = sorted((d.result for d in done), key=lambda r: (r["student"], r["seed"]))
    return {"seeds": args.seeds, "students": list(students), "unlabelled": 5000, "qat_epochs": args.qat_epochs,
            "qat_lr": args.qat_lr, "calibration": args.calibration, "runs": runs,
            "train_wall_seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/int8")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--jobs", type=int, default=0, help="runs side by side (default: one per core)")
    p.add_argument("--threads", default="1,0", help="latency thread counts, comma-separated (0: every core)")
    p.add_argument("--latency-only", action="store_true",
                   help="time the models of an earlier run of this script (--out's results.json) again")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    from pand.jobs import available_cores

    out = Path(args.out).absolute()
    students = tuple(args.students.split(","))
    if args.latency_only:
        results = json.loads((out / "results.json").read_text())
    else:
        results = train_and_score(args, out, students)
    runs = results["runs"]
    threads = sorted({int(t) or available_cores() for t in args.threads.split(",")})
    results["latency"] = {f"{s}, {t} thread{'s' if t > 1 else ''}": latency(
        next(r["files"] for r in runs if r["student"] == s and r["seed"] == 0), t, (1, 32), args.repeats)
        for t in threads for s in students}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
