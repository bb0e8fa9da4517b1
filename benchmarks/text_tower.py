"""A small text tower for the quickstart's open-vocabulary student: how often the student's zero-shot predictions with
it agree with its predictions with the teacher's text tower (Fashion-MNIST, a CPU).

The student is the transductive + ICL run of ``benchmarks/open_vocab_protocols.py`` for seed 0 (the quickstart's
base-to-novel setting: 5 seen / 5 unseen classes, 80 labelled and 5,000 unlabelled training images, ResNet-18 from
scratch), trained here the way that script trains it, or reused from ``--out`` (a finished run of that script in the
same folder is reused too). The text tower of its teacher (pand's Fashion-MNIST CLIP, ``pand teacher fit``) is then
distilled by ``pand teacher text-tower`` with its defaults, and once per ``--variant`` with options changed; the
setting with the best val top-1 matching is marked (val texts of the corpus, no image: the share of val texts whose
tower embedding is closer to their own teacher embedding than to any other val text's; unlike the val loss, it
compares settings with different losses). For each: the agreement on
val and test (base images among the base classes, novel among the novel ones, all images among all ten), the
student's top-1 with the teacher's tower and with the distilled one, and the fit's seconds.

Writes ``results.json`` and ``report.md`` into ``--out``; a tower folder that holds a finished fit is reused.

    python benchmarks/text_tower.py --out runs/text_tower
    python benchmarks/text_tower.py --variant warm_start=false --variant width=64,layers=2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from open_vocab_protocols import UNLABELLED_EPOCHS, _run_name, group_runs, student_run

#: The settings measured besides the defaults: without the warm start of the token embeddings, and without the
#: contrastive term.
VARIANTS = ("warm_start=false", "contrastive_weight=0")


def _options(text: str) -> dict[str, Any]:
    """``warm_start=false,width=64`` -> ``{"warm_start": False, "width": 64}`` (values read as YAML reads them)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}


def _row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    agreement, fit, cfg = record["agreement"], record["fit"], record["text_cfg"]
    row = {"setting": name, "size": f"{cfg['width']} x {cfg['layers']} ({cfg['heads']} heads)",
           "params": record["params"], "teacher_text_params": record["teacher_text_params"],
           "val_loss": fit["val_loss"], "val_cosine": fit["val_cosine"], "val_top1": fit["val_top1"],
           "best_step": fit["best_step"], "fit_seconds": fit["seconds"],
           "teacher_embedding_seconds": fit["teacher_embedding_seconds"],
           "class_cosine": agreement["class_embedding_cosine"]}
    for split in ("val", "test"):
        for part, r in agreement.get(split, {}).items():
            row[f"{split}/{part}"] = r
    return row


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def report(rows: list[dict[str, Any]], chosen: str, student: dict[str, Any], seconds: float) -> str:
    lines = ["| setting | size | params | val loss | val cosine | val top-1 | fit (s) | agreement val base | "
             "agreement test base / novel / all | top-1 test base: teacher's / distilled | top-1 test novel: "
             "teacher's / distilled |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (chosen on val)" if r["setting"] == chosen else ""
        base, novel, everything = r["test/base"], r["test/novel"], r["test/all"]
        lines.append(
            f"| {r['setting']}{mark} | {r['size']} | {r['params'] / 1e6:.2f} M | {r['val_loss']:.4f} | "
            f"{r['val_cosine']:.4f} | {100 * r['val_top1']:.1f} % | {r['fit_seconds']:.0f} | "
            f"{pct(r['val/base']['agreement'])} | {pct(base['agreement'])} / {pct(novel['agreement'])} / "
            f"{pct(everything['agreement'])} | {pct(base['top1_teacher_tower'])} / {pct(base['top1_distilled_tower'])} "
            f"| {pct(novel['top1_teacher_tower'])} / {pct(novel['top1_distilled_tower'])} |")
    some = rows[0]
    lines += ["", f"The teacher's text tower: {some['teacher_text_params'] / 1e6:.2f} M parameters. The student's own "
              f"report (its run's open_vocab.json, teacher's tower): base {pct(student['base'])}, novel "
              f"{pct(student['novel'])}, HM {pct(student['hm'])}.",
              "Class embedding cosine (teacher's vs distilled tower): " + "; ".join(
                  f"{r['setting']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["class_cosine"].items()) for r in rows),
              f"{seconds:.0f} s in all for this invocation."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pand.io import atomic_write_json, atomic_write_text
    from pand.quickstart import parser
    from pand.text_tower_fit import fit_text_tower

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/text_tower")
    p.add_argument("--seed", type=int, default=0, help="the student run's seed")
    p.add_argument("--variant", action="append", default=None,
                   help="options changed from the defaults, as k=v,k=v (repeatable; default: warm_start=false and "
                        "contrastive_weight=0)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.time()
    qs = parser().parse_args(["--out", str(out), "--unlabelled-epochs", str(UNLABELLED_EPOCHS)]
                             + (["--data-root", args.data_root] if args.data_root else []))
    unlabelled, overrides = group_runs("loss")["+icl"]  # the transductive run with CLIP-KD's ICL
    seed_dir = out / f"seed{args.seed}"
    summary = student_run(qs, args.seed, seed_dir, unlabelled, overrides, "the student")
    ckpt = seed_dir / _run_name(unlabelled, overrides) / "checkpoints" / "best.ckpt"
    settings = {"defaults": {}, **{v: _options(v) for v in (args.variant or VARIANTS)}}
    rows = []
    for label, options in settings.items():
        folder = out / "towers" / f"seed{args.seed}" / label.replace("=", "-").replace(",", "_")
        record_path = folder / "text_tower.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
        else:
            print(f"== text tower: {label}", flush=True)
            record = fit_text_tower(ckpt, folder, **options)
        rows.append(_row(label, record))
        print("RESULT " + json.dumps({k: v for k, v in rows[-1].items() if k != "class_cosine"}), flush=True)
    chosen = max(rows, key=lambda r: r["val_top1"])["setting"]
    text = report(rows, chosen, summary["open_vocab"]["student"], time.time() - start)
    atomic_write_json(out / "results.json", {"student": str(ckpt), "rows": rows, "chosen_on_val": chosen,
                                             "total_seconds": time.time() - start})
    atomic_write_text(out / "report.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
