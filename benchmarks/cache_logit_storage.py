"""How to store a classifier teacher's logits in the teacher cache: bytes per view against the error they put into
the KD loss, for full float16 rows and top-k rows (:func:`pand.cache.teacher.encode_topk`).

Teacher logits come from a cosine classifier over random class prototypes (d=64), so that similar classes get similar
logits (a tail with structure, not white noise); the scale is set so that the mean top-1 softmax probability is
``--confidence`` (0.85 by default, a trained teacher on its own training views; 0.6 for a weaker one). The student's
logits come from the same prototypes with more noise and half the scale, i.e. a student part-way through training.

Per sample, against float64 KD on the float32 logits: the relative error of the KD loss ``T^2 KL(p_t || p_s)`` at
``T`` (default 4), and the relative error of its gradient with respect to the student logits,
``|p_t' - p_t| / |p_s - p_t|`` (what training actually feels); median and 99th percentile over the samples. ``LS``
repeats the loss error with logit standardisation (``method.standardize=true``), whose per-row z-score sees every
class, so a flattened tail moves it more.

    python benchmarks/cache_logit_storage.py [--samples 4096] [--temperature 4] [--confidence 0.85]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from pand.cache.codecs import decode_int8_rows, encode_int8_rows
from pand.cache.integrity import index_dtype
from pand.cache.teacher import decode_topk, encode_topk


def _logits(n: int, c: int, scale: float, noise: float, gen: torch.Generator, prototypes: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    h = prototypes[labels] + noise * torch.randn(n, prototypes.shape[1], generator=gen, dtype=torch.float64) / 8
    return scale * F.normalize(h, dim=-1) @ prototypes.t()


def teacher_and_student(n: int, c: int, confidence: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(c, 64, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, c, (n,), generator=gen)
    state = gen.get_state()
    lo, hi = 0.1, 200.0
    for _ in range(60):  # bisect the scale for the wanted mean top-1 probability
        mid = (lo + hi) / 2
        gen.set_state(state)
        z = _logits(n, c, mid, 1.0, gen, prototypes, labels)
        lo, hi = (mid, hi) if z.softmax(-1).amax(-1).mean() < confidence else (lo, mid)
    gen.set_state(state)
    teacher = _logits(n, c, lo, 1.0, gen, prototypes, labels)
    student = _logits(n, c, lo / 2, 2.0, gen, prototypes, labels)
    return teacher, student


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t


def standardize(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def storage(c: int, kind: str) -> tuple[int, callable]:
    """Bytes per view and the round trip of one float32 row batch through that storage: ``float32``, ``float16``,
    ``int8`` (per-row float16 scale, :mod:`pand.cache.codecs`; measured by ``cache_output_storage.py``) or ``topK``."""
    if kind == "float32":
        return 4 * c, lambda z: z.float().double()
    if kind == "float16":
        return 2 * c, lambda z: z.float().half().double()
    if kind == "int8":
        return c + 2, lambda z: decode_int8_rows(*encode_int8_rows(z.float())).double()
    k = int(kind.removeprefix("top"))
    bytes_per_view = 2 * (k + 1) + index_dtype(c).itemsize * k

    def round_trip(z: torch.Tensor) -> torch.Tensor:
        values, index = encode_topk(z.float(), k)
        return decode_topk(values.half(), index.to(torch.int16 if c < 2**15 else torch.int32), c).double()

    return bytes_per_view, round_trip


def measure(c: int, kind: str, teacher: torch.Tensor, student: torch.Tensor, t: float) -> dict[str, float]:
    nbytes, round_trip = storage(c, kind)
    stored = round_trip(teacher)
    reference = teacher.float().double()  # what a live float32 teacher hands the loss
    loss = kd_per_sample(student, reference, t)
    loss_err = (kd_per_sample(student, stored, t) - loss).abs() / loss
    ls = kd_per_sample(standardize(student), standardize(reference), t)
    ls_err = (kd_per_sample(standardize(student), standardize(stored), t) - ls).abs() / ls
    p_t, p_s = (reference / t).softmax(-1), (student / t).softmax(-1)
    grad_err = ((stored / t).softmax(-1) - p_t).norm(dim=-1) / (p_s - p_t).norm(dim=-1)
    batch_err = abs(float(kd_per_sample(student, stored, t).mean() / loss.mean()) - 1)

    def q(x: torch.Tensor, level: float) -> float:
        return float(np.quantile(x.numpy(), level))

    return {"bytes": nbytes, "loss_med": q(loss_err, 0.5), "loss_p99": q(loss_err, 0.99), "batch": batch_err,
            "grad_med": q(grad_err, 0.5), "grad_p99": q(grad_err, 0.99), "ls_med": q(ls_err, 0.5),
            "ls_p99": q(ls_err, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--confidence", type=float, default=0.85)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20, 50, 200])
    args = parser.parse_args()
    print(f"T={args.temperature}, mean teacher top-1 probability {args.confidence}, {args.samples} samples")
    print("| C | storage | bytes / view | KD loss rel. err. median | p99 | batch mean | gradient rel. err. median "
          "| p99 | LS loss rel. err. median | p99 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in args.classes:
        teacher, student = teacher_and_student(args.samples, c, args.confidence)
        kinds = ["float32", "float16"] + [f"top{k}" for k in args.topk if k < c]
        for kind in kinds:
            r = measure(c, kind, teacher, student, args.temperature)
            print(f"| {c} | {kind} | {r['bytes']} | {r['loss_med']:.1e} | {r['loss_p99']:.1e} | {r['batch']:.1e} | "
                  f"{r['grad_med']:.1e} | {r['grad_p99']:.1e} | {r['ls_med']:.1e} | {r['ls_p99']:.1e} |")


if __name__ == "__main__":
    main()
