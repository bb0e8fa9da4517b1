"""Compact storage of the teacher outputs a teacher cache holds per view: bytes per view against the error each
storage puts into the training losses that read them.

Image embeddings (L2-normalised, D = 512, 768, 1024) in float32 (the reference: what a live fp32 teacher hands the
losses), float16 (the cache's storage today), bfloat16 and int8 with a per-row float16 scale
(:mod:`pand.cache.codecs`); class logits (C = 100, 1000) in float16, top-k (:func:`pand.cache.teacher.encode_topk`)
and int8. Every loss is pand's own function (:mod:`pand.losses`) as the distillers call it, per sample where it is a
mean over samples, per batch where it relates the samples of a batch:

* ``FD cos``, ``FD MSE``: KDEOV's / CLIP-KD's feature distillation (``embedding_distill_loss``, cosine and l2);
* ``ICL``: CLIP-KD's interactive contrastive loss, InfoNCE of the student's embeddings against the batch's teacher
  embeddings, at CLIP's logit scale 100 (tau 0.01) and at pand's ``relation_temperature`` 0.07; per batch;
* ``affinity``: TinyCLIP's affinity mimicking / CLIP-KD's CRD KL over the class text embeddings, at tau 0.01 and
  0.07; per batch;
* ``VL2Lite visual``: ``mean |norm(h) - norm(MLP_img(t))|`` through a condensation MLP (random init, D -> 512 -> 512);
* ``VL2Lite linguistic``: its KD at T=2 (scale 0.5) of the student's condensed text logits against the teacher's
  zero-shot logits ``s * t @ T^T`` at pand's teacher logit scale s = 1/0.07 (VL2Lite, PAND);
* ``teacher CE``: the head's cross-entropy against ``softmax(s * t @ T^T)`` for an unlabelled image (VL2Lite, PAND);
* ``NLRD``: PAND's neighbourhood logit relation distillation (k=3) of the student's class logits against the same
  teacher logits; per batch;
* ``KD T=1``, ``KD T=4``: Hinton KD on stored class logits, as ``cache_logit_storage.py`` measures it (its data and
  functions, imported).

Each cell: the relative error of the loss against float32 storage, ``|L' - L| / L``, median / 99th percentile over
4,096 samples (per-sample terms) or 256 random batches of 64 (per-batch terms); the float32 row gives the median
loss instead, to show its size. The last columns: the largest 99th percentile, over the terms, of the relative error
of the gradient of a batch's loss with respect to its student inputs (``|g' - g| / |g|``, the same 256 batches), which
is what training feels; terms whose gradient jumps (VL2Lite's L1 signs, NLRD's choice of neighbours) apart.

Synthetic teacher embeddings: CLIP-like geometry in D dimensions. Images and class texts sit in two cones (a shared
direction plus one per modality: the modality gap); each class has a direction from an 8-dimensional latent, so that
classes are more or less alike. An image embedding is its cone + its class direction + isotropic noise: cosine
0.29-0.33 to its class's text embedding (its prototype) against 0.17-0.21 to the others, 0.68-0.70 to images of its
class and 0.56-0.58 to the others; at CLIP's logit scale 100, zero-shot mean top-1 probability 0.71-0.78 (100
classes). A half-trained student embedding has cosine 0.7 with its teacher embedding, the rest of the way towards
another image of its class (70 %) or of a random class. The script prints these figures for each D.
``--real`` adds the rows of the shipped Fashion-MNIST CLIP stand-in (``fmnist_clip``, D = 96, 10 classes) on
Fashion-MNIST test images (skipped, with the reason, when the data is absent); its student is made the same way.

    python benchmarks/cache_output_storage.py [--real] [--samples 4096] [--dims 512 768 1024]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from cache_logit_storage import kd_per_sample, measure, storage, teacher_and_student
from torch.func import grad, grad_and_value, vmap

from pand.cache.codecs import decode_bf16_rows, decode_int8_rows, encode_bf16_rows, encode_int8_rows
from pand.data import fashion_mnist
from pand.data.transforms import ReplayableAugment, eval_transform
from pand.distillers.base import Distiller
from pand.distillers.vl2lite import condensation_mlp
from pand.errors import PandError
from pand.losses import (
    affinity_mimicking_loss,
    embedding_distill_loss,
    interactive_contrastive_loss,
    nlrd_loss,
    vl2lite_linguistic_loss,
    vl2lite_visual_loss,
)
from pand.teachers.clip import load_clip_teacher
from pand.teachers.standin_fit import ARCHITECTURE, ASSET_PATH, EVAL_TEMPLATE, IMAGE_SIZE

#: CLIP's learned logit scale at the end of pre-training (the ICL / affinity temperature 0.01).
CLIP_SCALE = 100.0
#: The teacher logit scale VL2Lite and PAND fix (``teacher.logit_scale``: 1/0.07), and pand's relation temperature.
PAND_SCALE = 1 / 0.07
#: VL2Lite's condensed width: a ResNet-18 student's feature width.
STUDENT_WIDTH = 512
#: Apple's dataset reinforcement (Faghri et al., ICCV 2023): top-10 teacher probabilities and compressed augmentation
#: parameters of each view, about 73 bytes.
DR_BYTES = 73
EMBED_STORAGES = ("float32", "float16", "bfloat16", "int8")
EMBED_TERMS = ("FD cos", "FD MSE", "ICL τ=0.01", "ICL τ=0.07", "affinity τ=0.01", "affinity τ=0.07",
               "VL2Lite visual", "VL2Lite linguistic", "teacher CE", "NLRD")
LOGIT_TERMS = ("KD T=1", "KD T=4")
#: Terms whose gradient jumps where a stored value crosses a boundary, however small its error: VL2Lite's visual L1
#: (the sign of each residual) and NLRD (each sample's neighbours, picked by the teacher's logits). They get their own
#: gradient column, so the smooth terms' is not hidden behind them.
JUMPING = ("VL2Lite visual", "NLRD")
COLUMNS = ("output", "size", "storage", "bytes / view (with params)", "1 - cos, p99", "max abs err", *EMBED_TERMS,
           *LOGIT_TERMS, "gradient rel. err. p99, worst smooth term", "same, worst term with jumps")


def embed_round_trip(kind: str) -> tuple[Callable[[int], int], Callable[[torch.Tensor], torch.Tensor]]:
    """Bytes per view of a D-wide row, and the round trip of float32 rows through the storage."""
    if kind == "float32":
        return lambda d: 4 * d, lambda t: t.clone()
    if kind == "float16":
        return lambda d: 2 * d, lambda t: t.half().float()
    if kind == "bfloat16":
        return lambda d: 2 * d, lambda t: decode_bf16_rows(encode_bf16_rows(t))
    if kind == "int8":  # the row's int8 values and its float16 scale
        return lambda d: d + 2, lambda t: decode_int8_rows(*encode_int8_rows(t))
    raise ValueError(kind)


# -- data -----------------------------------------------------------------------------------------------------------
def half_trained(target: torch.Tensor, other: torch.Tensor, cos: float = 0.7) -> torch.Tensor:
    """Unit rows at cosine ``cos`` to ``target``, the rest of the way towards ``other`` (orthogonalised)."""
    target = F.normalize(target, dim=-1)
    rest = other - (other * target).sum(-1, keepdim=True) * target
    return cos * target + (1 - cos**2) ** 0.5 * F.normalize(rest, dim=-1)


def confused_labels(labels: torch.Tensor, classes: int, gen: torch.Generator, right: float = 0.7) -> torch.Tensor:
    """The class a half-trained student puts each sample near: its own with probability ``right``, else any."""
    other = torch.randint(0, classes, labels.shape, generator=gen)
    return torch.where(torch.rand(labels.shape, generator=gen) < right, labels, other)


def synthetic_clip(n: int, d: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """CLIP-like teacher image embeddings [n, d], class text embeddings [classes, d], labels, and one more image
    embedding per sample of the class its student confuses it with (see the module docstring)."""
    f64 = torch.float64
    shared, image_cone, text_cone = F.normalize(torch.randn(3, d, generator=gen, dtype=f64), dim=-1)
    latent = torch.randn(classes, 8, generator=gen, dtype=f64) @ torch.randn(8, d, generator=gen, dtype=f64)
    class_dir = F.normalize(latent, dim=-1)
    text_noise = F.normalize(torch.randn(classes, d, generator=gen, dtype=f64), dim=-1)
    text = F.normalize(1.5 * (shared + 1.5 * text_cone) + class_dir + 0.6 * text_noise, dim=-1)

    def images(labels: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(len(labels), d, generator=gen, dtype=f64) / d**0.5
        return F.normalize(0.6 * (shared + 1.5 * image_cone) + 0.5 * class_dir[labels] + 0.8 * noise, dim=-1)

    labels = torch.randint(0, classes, (n,), generator=gen)
    teacher = images(labels)
    other = images(confused_labels(labels, classes, gen))
    return teacher.float(), text.float(), labels, other.float()


def real_clip(n: int, root: str, gen: torch.Generator) -> tuple[torch.Tensor, ...] | str:
    """The shipped Fashion-MNIST CLIP stand-in on ``n`` test images, as :func:`synthetic_clip` returns; or why not."""
    try:
        data = fashion_mnist.load(root, "test")
    except PandError as err:
        return f"no Fashion-MNIST ({str(err).splitlines()[0]})"
    if not ASSET_PATH.is_file():
        return f"no shipped teacher weights at {ASSET_PATH}"
    teacher = load_clip_teacher(ARCHITECTURE, str(ASSET_PATH))
    pick = torch.randperm(len(data), generator=gen)[:n]
    transform = eval_transform(IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        images = torch.stack([transform(data.load_image(int(i))) for i in pick])
        embeds = torch.cat([teacher.encode_images(images[i:i + 512]) for i in range(0, n, 512)])
        text = teacher.class_embeddings(list(data.classes), [EVAL_TEMPLATE])
    labels = torch.as_tensor([data.targets[int(i)] for i in pick])
    # another test image (never the same one) of the class the student confuses each image with
    wanted = confused_labels(labels, len(data.classes), gen)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(len(data.classes))]
    pick_other = []
    for i, c in enumerate(wanted.tolist()):
        at = int(torch.randint(len(by_class[c]), (1,), generator=gen))
        j = int(by_class[c][at])
        pick_other.append(j if j != i else int(by_class[c][(at + 1) % len(by_class[c])]))
    return embeds.float(), text.float(), labels, embeds[pick_other].float()


def describe(label: str, teacher: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, other: torch.Tensor) -> str:
    """The geometry the docstring claims, measured: one line."""
    sim = teacher @ text.t()
    own = sim.gather(1, labels[:, None]).squeeze(1)
    pairs = teacher[:1024] @ teacher[:1024].t()
    same = (labels[:1024, None] == labels[None, :1024]) & ~torch.eye(len(pairs), dtype=torch.bool)
    p = (CLIP_SCALE * sim).softmax(-1)
    peak = teacher.abs().amax(-1) * teacher.shape[1] ** 0.5  # max |x| / rms: what sets an int8 row's step
    return (f"{label}, D={teacher.shape[1]}, {len(text)} classes: cosine to own class text {own.mean():.2f}, to the "
            f"others {(sim.sum(1) - own).mean() / (len(text) - 1):.2f}; image-image same class {pairs[same].mean():.2f}"
            f", other {pairs[~same & ~torch.eye(len(pairs), dtype=torch.bool)].mean():.2f}; zero-shot at scale 100: "
            f"top-1 {(p.argmax(-1) == labels).float().mean():.2f}, mean top-1 probability {p.amax(-1).mean():.2f}; "
            f"student cosine {(half_trained(teacher, other) * teacher).sum(-1).mean():.2f}; max|x|/rms median "
            f"{peak.median():.1f}")


# -- measurement ----------------------------------------------------------------------------------------------------
def quantiles(x: torch.Tensor) -> tuple[float, float]:
    values = x.double().numpy()
    return float(np.quantile(values, 0.5)), float(np.quantile(values, 0.99))


def embed_terms(teacher: torch.Tensor, text: torch.Tensor, other: torch.Tensor, gen: torch.Generator) -> dict:
    """Per term: (per-sample or per-batch, the loss of (student input, stored teacher embeddings), the student input,
    the index of the batches). Student inputs are fixed from float32 teacher values: only the storage varies."""
    d = teacher.shape[1]
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))  # the condensation MLPs' init
    image_mlp, text_mlp = condensation_mlp(d, STUDENT_WIDTH), condensation_mlp(d, STUDENT_WIDTH)
    for p in [*image_mlp.parameters(), *text_mlp.parameters()]:
        p.requires_grad_(False)
    condensed_text = F.normalize(text_mlp(text), dim=-1)
    # a half-trained student: embedding at cosine 0.7 to the teacher's, features at cosine 0.7 to the condensed
    # teacher embedding, class logits at pand's scale from its embedding
    student = half_trained(teacher, other)
    features = half_trained(F.normalize(image_mlp(teacher), dim=-1), F.normalize(image_mlp(other), dim=-1))
    student_logits = PAND_SCALE * student @ text.t()
    unlabelled = {"label": torch.tensor([-1])}

    def zero_shot(t: torch.Tensor) -> torch.Tensor:  # Distiller.teacher_logits with the template embeddings
        return PAND_SCALE * t.float() @ text.float().t()

    return {
        "FD cos": ("sample", lambda s, t: embedding_distill_loss(s, t, "cosine"), student),
        "FD MSE": ("sample", lambda s, t: embedding_distill_loss(s, t, "l2"), student),
        "ICL τ=0.01": ("batch", lambda s, t: interactive_contrastive_loss(s, t, 1 / CLIP_SCALE), student),
        "ICL τ=0.07": ("batch", lambda s, t: interactive_contrastive_loss(s, t, 0.07), student),
        "affinity τ=0.01": ("batch", lambda s, t: affinity_mimicking_loss(s, t, text, 1 / CLIP_SCALE), student),
        "affinity τ=0.07": ("batch", lambda s, t: affinity_mimicking_loss(s, t, text, 0.07), student),
        "VL2Lite visual": ("sample", lambda h, t: vl2lite_visual_loss(h, F.normalize(image_mlp(t), dim=-1)),
                           features),
        "VL2Lite linguistic": ("sample", lambda h, t: vl2lite_linguistic_loss(
            PAND_SCALE * F.normalize(h, dim=-1) @ condensed_text.t(), zero_shot(t), 2.0, 0.5), features),
        "teacher CE": ("sample", lambda z, t: Distiller.teacher_soft_cross_entropy(z, unlabelled, zero_shot(t)),
                       student_logits),
        "NLRD": ("batch", lambda z, t: nlrd_loss(z, zero_shot(t), 3), student_logits),
    }


def evaluate(kind: str, loss: Callable, x: torch.Tensor, t: torch.Tensor, batches: torch.Tensor):
    """The losses, per sample (``kind == "sample"``: each sample a batch of one) or per batch, and the gradient of
    each batch's loss with respect to its student inputs, ``[batches, batch, ...]``."""
    if kind == "sample":
        def one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return loss(a[None], b[None])
        g, value = vmap(grad_and_value(one))(x, t)
        # the batch's loss is the mean of its samples': its gradient is theirs over the batch size
        return value, g[batches] / batches.shape[1]
    g, value = vmap(grad_and_value(loss))(x[batches], t[batches])
    return value, g


def grad_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """p99 over the batches of ``|g' - g| / |g|``, each g the gradient of a batch's loss w.r.t. all its inputs."""
    return quantiles((got - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1))[1]


def embed_rows(label: str, teacher: torch.Tensor, text: torch.Tensor, other: torch.Tensor, args,
               gen: torch.Generator) -> list[dict]:
    terms = embed_terms(teacher, text, other, gen)
    batches = torch.stack([torch.randperm(len(teacher), generator=gen)[:args.batch] for _ in range(args.batches)])
    reference = {name: evaluate(kind, fn, x, teacher, batches) for name, (kind, fn, x) in terms.items()}
    rows = []
    for storage_kind in EMBED_STORAGES:
        nbytes, round_trip = embed_round_trip(storage_kind)
        stored = round_trip(teacher)
        row = {"output": label, "size": f"D={teacher.shape[1]}", "storage": storage_kind,
               "bytes": nbytes(teacher.shape[1]), **value_errors(teacher, stored)}
        worst, jumps = (0.0, ""), (0.0, "")
        for name, (kind, fn, x) in terms.items():
            ref_loss, ref_grad = reference[name]
            if storage_kind == "float32":
                row[name] = f"({quantiles(ref_loss)[0]:.2g})"
                continue
            loss, g = evaluate(kind, fn, x, stored, batches)
            row[name] = "{:.1e} / {:.1e}".format(*quantiles((loss - ref_loss).abs() / ref_loss.abs()))
            if name in JUMPING:
                jumps = max(jumps, (grad_error(g, ref_grad), name))
            else:
                worst = max(worst, (grad_error(g, ref_grad), name))
        row["grad"] = f"{worst[0]:.1e} ({worst[1]})" if worst[1] else ""
        row["jumps"] = f"{jumps[0]:.1e} ({jumps[1]})" if jumps[1] else ""
        rows.append(row)
    return rows


def value_errors(reference: torch.Tensor, stored: torch.Tensor) -> dict:
    ref, got = reference.double(), stored.double()
    if torch.equal(ref, got):  # float64 rounding would print 2e-16 for identical rows
        return {"1-cos": "0", "maxabs": "0"}
    # float64: float16's 1 - cos is ~1e-8, below float32's resolution; clamped, as identical rows give +-1e-16
    one_minus_cos = (1 - F.cosine_similarity(ref, got, dim=-1)).clamp(min=0)
    return {"1-cos": f"{quantiles(one_minus_cos)[1]:.1e}", "maxabs": f"{float((ref - got).abs().max()):.1e}"}


def logit_rows(c: int, args, gen: torch.Generator) -> list[dict]:
    teacher, student = teacher_and_student(args.samples, c, args.confidence)
    batches = torch.stack([torch.randperm(len(teacher), generator=gen)[:args.batch] for _ in range(args.batches)])

    def kd_grad(t: torch.Tensor, temperature: float) -> torch.Tensor:  # per sample, then grouped as in evaluate()
        g = vmap(grad(lambda s, z: kd_per_sample(s[None], z[None], temperature).sum()))(student, t)
        return g[batches] / batches.shape[1]

    references = {temperature: kd_grad(teacher.float().double(), temperature) for temperature in (1.0, 4.0)}

    rows = []
    for kind in ["float32", "float16", *(f"top{k}" for k in args.topk if k < c), "int8"]:
        nbytes, round_trip = storage(c, kind)
        row = {"output": "class logits", "size": f"C={c}", "storage": kind.replace("top", "top-"), "bytes": nbytes,
               **value_errors(teacher.float(), round_trip(teacher))}
        worst = (0.0, "")
        for name, temperature in zip(LOGIT_TERMS, (1.0, 4.0)):
            if kind == "float32":
                row[name] = f"({quantiles(kd_per_sample(student, teacher.float().double(), temperature))[0]:.2g})"
                continue
            r = measure(c, kind, teacher, student, temperature)
            row[name] = f"{r['loss_med']:.1e} / {r['loss_p99']:.1e}"
            worst = max(worst, (grad_error(kd_grad(round_trip(teacher), temperature), references[temperature]), name))
        row["grad"] = f"{worst[0]:.1e} ({worst[1]})" if worst[1] else ""
        rows.append(row)
    return rows


def print_table(rows: list[dict], param_bytes: int) -> None:
    keys = ("output", "size", "storage", "bytes", "1-cos", "maxabs", *EMBED_TERMS, *LOGIT_TERMS, "grad", "jumps")
    print("| " + " | ".join(COLUMNS) + " |")
    print("| " + " | ".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + " |")
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        if isinstance(row.get("bytes"), int):
            cells[3] = f"{row['bytes']:,} ({row['bytes'] + param_bytes:,})"
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64, help="batch size of the per-batch terms")
    parser.add_argument("--batches", type=int, default=256, help="random batches drawn for the per-batch terms")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--text-classes", type=int, default=100, help="class text embeddings of the synthetic CLIP")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000], help="logit rows' class counts")
    parser.add_argument("--topk", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--confidence", type=float, default=0.85, help="logit teacher's mean top-1 probability")
    parser.add_argument("--real", action="store_true", help="add the fmnist_clip teacher on Fashion-MNIST images")
    parser.add_argument("--data-root", default="data", help="Fashion-MNIST root (the system copy is also searched)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    param_bytes = 4 * ReplayableAugment().num_params  # float32 augmentation parameters of each view
    rows, notes = [], []
    for d in args.dims:
        teacher, text, labels, other = synthetic_clip(args.samples, d, args.text_classes, gen)
        notes.append(describe("synthetic CLIP", teacher, text, labels, other))
        rows += embed_rows("image embeddings", teacher, text, other, args, gen)
    if args.real:
        real = real_clip(args.samples, args.data_root, gen)
        if isinstance(real, str):
            notes.append(f"--real skipped: {real}")
        else:
            teacher, text, labels, other = real
            notes.append(describe("fmnist_clip on Fashion-MNIST test images", teacher, text, labels, other))
            rows += embed_rows("image embeddings, fmnist_clip", teacher, text, other, args, gen)
    for c in args.classes:
        rows += logit_rows(c, args, gen)
    rows.append({"output": "augmentation params", "size": f"P={param_bytes // 4}", "storage": "float32",
                 "bytes": f"{param_bytes:,}"})
    rows.append({"output": "Apple's dataset reinforcement: top-10 probabilities + compressed augmentation params",
                 "storage": "(for comparison)", "bytes": f"about {DR_BYTES} (whole row)"})
    print(f"{args.samples} samples; per-batch terms: {args.batches} batches of {args.batch}; "
          f"synthetic CLIP with {args.text_classes} classes; logits: mean teacher top-1 probability {args.confidence}; "
          f"cells: loss rel. error median / p99 against float32 storage, (median loss) on the float32 rows; "
          f"bytes: the output, (with the {param_bytes} bytes of augmentation params)")
    print("\n".join(notes))
    print_table(rows, param_bytes)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
