"""Fit pand's offline stand-in teacher: a compact CLIP (``pand-fmnist-clip``) trained on Fashion-MNIST.

Public CLIP weights cannot be downloaded everywhere pand runs, so pand ships a small CLIP-architecture model that it
fits itself, contrastively, on the Fashion-MNIST **train** split with captions built from the class names
(``pand teacher fit`` / ``scripts/fit_fmnist_teacher.py``). It is a stand-in for a real CLIP, not a replacement.

Recipe (all seeded; the same seed, thread count and library versions give the same weights):

* images: the 28x28 grey images resized once to 32 px with the kernel of :func:`pand.data.transforms.eval_transform`,
  kept as one uint8 tensor; per batch a random crop with 4 px zero padding and a horizontal flip, then grey -> RGB and
  CLIP mean/std normalisation;
* captions: every image gets a template drawn at random from :data:`TEMPLATES`, filled with its class name; each step
  text-encodes only the ``C x len(TEMPLATES)`` distinct captions (tokenised once);
* loss: class-aware CLIP loss. Image -> text is a cross-entropy of image ``i`` against the ``C`` class captions in
  image ``i``'s template; text -> image scores each image's caption against every image of the batch with soft targets
  spread over the images of the same class. The logit scale is learned as in CLIP (init 1/0.07, clamped at 100);
* report: zero-shot top-1 on val and test through pand's own teacher path (``load_clip_teacher`` on the written file,
  the template ``"a photo of a {}, a type of clothing."``, ``eval_transform(32, 32)``), never used for fitting.

Weights are stored as float16 safetensors (open_clip loads them into its float32 model); the report is written as
JSON next to them (same stem, ``.json``).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from pathlib import Path

from pand.arguments import ArgumentParser

#: open_clip model name of the fitted teacher (``model_configs/pand-fmnist-clip.json``).
ARCHITECTURE = "pand-fmnist-clip"
#: Where the shipped weights and report live (``${pand_asset:fmnist-clip.safetensors}``).
ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "fmnist-clip.safetensors"
IMAGE_SIZE = 32
PAD = 4

#: Template of ``configs/data/fashion_mnist.yaml``; the one the report's zero-shot accuracy uses.
EVAL_TEMPLATE = "a photo of a {}, a type of clothing."
#: Hand-written caption templates, one drawn at random per training image.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of clothing.",
    "a photo of a {}.",
    "a {} made of fabric.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale photo of the {}.",
    "a product photo of a {}.",
    "a picture of a {}, a fashion item.",
)

#: Defaults that produced the shipped ``assets/fmnist-clip.safetensors``.
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
#: Intra-op threads while fitting. One, not two: on a shared 2-core machine two OpenMP threads stall at every
#: barrier as soon as another process competes for a core (measured 3-7 s/step against 1.1 s/step with one thread).
DEFAULT_NUM_THREADS = 1
WEIGHT_DECAY = 0.05
WARMUP_STEPS = 100
MAX_LOGIT_SCALE = 100.0


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def report_path(out_path: str | Path) -> Path:
    """The fit report next to the weights: same stem, ``.json``."""
    return Path(out_path).with_suffix(".json")


def main_fit(args: Sequence[str] | None = None) -> int:
    """``pand teacher fit [--out PATH] [--epochs N] [--seed S] ...``; returns the exit status."""
    p = ArgumentParser(
        prog="pand teacher fit",
        description=f"Fit pand's stand-in CLIP teacher ({ARCHITECTURE}) on the Fashion-MNIST train split.",
    )
    p.add_argument("--out", default=str(ASSET_PATH), help="weights file to write (.safetensors); the report goes "
                   "next to it as .json (default: the packaged asset)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the system copy)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=DEFAULT_NUM_THREADS, help="intra-op CPU threads while fitting")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    ns = p.parse_args(list(args) if args is not None else None)
    from pand.teachers.fitting import fit_teacher

    report = fit_teacher(
        ns.out,
        data_root=ns.data_root,
        epochs=ns.epochs,
        batch_size=ns.batch_size,
        lr=ns.lr,
        seed=ns.seed,
        device=ns.device,
        progress=not ns.quiet,
        num_threads=ns.threads,
    )
    print(
        f"wrote {ns.out} and {report_path(ns.out)}: {report['params']} params, {report['seconds']} s, "
        f"zero-shot top-1 val {report['val_top1']:.4f} test {report['test_top1']:.4f}"
    )
    return 0
