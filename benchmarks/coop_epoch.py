"""PAND stage 1 (CoOp) on stored features: time per epoch at CUB size (6,000 x D features, 200 classes).

The image tower never runs in stage 1; each step re-encodes the 200 class prompts through the frozen text tower, so
the text tower's size sets the cost. Random weights, nothing downloaded. Measures ``--steps`` optimisation steps
(forward, backward, SGD step; the same code as ``train_coop``) after a warm-up step and extrapolates to one epoch of
``ceil(6000 / 32)`` steps; the printed line says how many steps were measured.

    python benchmarks/coop_epoch.py --teacher convnext_xxlarge --steps 2      # the paper's teacher, D = 1024
    python benchmarks/coop_epoch.py --teacher pand-tiny-vit --full-epoch      # a whole epoch, tiny text tower
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from pand.stage1.coop import train_coop
from pand.stage1.learner import PromptLearner
from pand.teachers import load_clip_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="convnext_xxlarge")
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--full-epoch", action="store_true", help="time a whole epoch with train_coop instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    teacher = load_clip_teacher(args.teacher, "random", device=args.device)
    d = teacher.embed_dim
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(args.samples, d, generator=g), dim=-1)
    labels = torch.randint(0, args.classes, (args.samples,), generator=g)
    names = [f"bird species number {i}" for i in range(args.classes)]  # CUB-like names of a few tokens
    learner = PromptLearner(teacher.model, teacher.tokenizer, names, n_ctx=args.n_ctx).to(args.device)
    steps_per_epoch = math.ceil(args.samples / args.batch)
    if args.full_epoch:
        start = time.perf_counter()
        train_coop(learner, feats, labels, feats[:500], labels[:500], logit_scale=teacher.logit_scale, epochs=1,
                   batch_size=args.batch, device=args.device, progress=False)
        epoch_s, measured = time.perf_counter() - start, steps_per_epoch
    else:
        opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
        times = []
        for step in range(args.steps + 1):
            idx = torch.randint(0, args.samples, (args.batch,), generator=g)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            logits = teacher.logit_scale * feats[idx].to(args.device) @ learner().t()
            loss = F.cross_entropy(logits, labels[idx].to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t)
        epoch_s, measured = sum(times) / len(times) * steps_per_epoch, len(times)
    result = {"teacher": args.teacher, "embed_dim": d, "samples": args.samples, "classes": args.classes,
              "batch": args.batch, "n_ctx": args.n_ctx, "device": args.device, "threads": torch.get_num_threads(),
              "steps_per_epoch": steps_per_epoch, "measured_steps": measured,
              "seconds_per_step": round(epoch_s / steps_per_epoch, 3), "seconds_per_epoch": round(epoch_s, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        how = "whole epoch measured" if args.full_epoch else f"extrapolated from {measured} measured steps"
        print(f"CoOp stage 1, {args.teacher} text tower (D={d}), {args.samples} x {d} features, {args.classes} "
              f"classes, batch {args.batch}, {args.device} ({torch.get_num_threads()} threads): "
              f"{result['seconds_per_step']} s/step, {result['seconds_per_epoch']} s/epoch ({how})")


if __name__ == "__main__":
    main()
