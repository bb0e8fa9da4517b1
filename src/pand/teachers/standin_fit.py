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

One module: the recipe's constants, the command line (:func:`main_fit`) and the fitting (:func:`fit_teacher`).
torch, torchvision and open_clip are imported inside the functions that use them, so that importing this
module (``pand teacher fit --help``) stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pand.arguments import ArgumentParser
from pand.io import atomic_write_bytes, atomic_write_json

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


# --------------------------------------------------------------------------- CLI


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


# --------------------------------------------------------------------------- data


def _grey_uint8(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``ds`` as a uint8 ``[N, 1, H, W]`` tensor and the targets as int64 ``[N]``."""
    import numpy as np
    import torch

    from pand.data.base import ArrayDataset, SubsetDataset

    if isinstance(ds, ArrayDataset):
        arr = ds.images
    elif isinstance(ds, SubsetDataset) and isinstance(ds.parent, ArrayDataset):
        arr = ds.parent.images[np.asarray(ds.indices, dtype=np.int64)]
    else:
        arr = np.stack([np.asarray(ds.load_image(i).convert("L"), dtype=np.uint8) for i in range(len(ds))])
    x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).unsqueeze(1)
    return x, torch.as_tensor(list(ds.targets), dtype=torch.int64)


def _resize_uint8(x: torch.Tensor, size: int = IMAGE_SIZE, chunk: int = 8192) -> torch.Tensor:
    """Batched resize with the kernel eval_transform uses (bilinear, antialiased, on uint8)."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    return torch.cat(
        [
            TF.resize(x[i : i + chunk], [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
            for i in range(0, len(x), chunk)
        ]
    )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 grey ``[B, 1, H, W]`` -> float RGB ``[B, 3, H, W]`` in CLIP normalisation."""
    import torch

    from pand.data.transforms import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32).div(255.0).expand(-1, 3, -1, -1) - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with ``PAD`` px zero padding and a horizontal flip (p=0.5) of a uint8 ``[B, 1, S, S]`` batch."""
    import torch
    import torch.nn.functional as F

    b, _, s, _ = x.shape
    xp = F.pad(x, (PAD, PAD, PAD, PAD))
    top = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    ar = torch.arange(s)
    rows = top[:, None] + ar
    cols = left[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


# --------------------------------------------------------------------------- model


def _build_model() -> torch.nn.Module:
    import open_clip

    from pand.teachers.clip import register_model_configs

    register_model_configs()
    return open_clip.create_model(
        ARCHITECTURE, pretrained=None, pretrained_image=False, pretrained_text=False, require_pretrained=False
    )


def _contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, tidx: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Class-aware CLIP loss.

    img: ``[B, D]`` normalised image embeddings; txt: ``[C, T, D]`` normalised caption embeddings (class x template);
    labels, tidx: class and template of each image's caption.
    """
    import torch
    import torch.nn.functional as F

    # image -> text: image i against the C class captions written with image i's template
    per_image_classes = txt[:, tidx].permute(1, 0, 2)  # [B, C, D]
    logits_i2t = scale * torch.einsum("bd,bcd->bc", img, per_image_classes)
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    # text -> image: caption j against every image, soft targets over the images of caption j's class
    captions = txt[labels, tidx]  # [B, D]
    logits_t2i = scale * captions @ img.t()
    same = (labels[:, None] == labels[None, :]).to(img.dtype)
    targets = same / same.sum(1, keepdim=True)
    loss_t2i = -(targets * F.log_softmax(logits_t2i, dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def _quick_accuracy(model: torch.nn.Module, tokens: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Zero-shot top-1 of the in-memory model with the eval template (progress only; the report reloads the file)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        was_training = model.training
        model.eval()
        cls = F.normalize(model.encode_text(tokens).float(), dim=-1)
        correct = 0
        for i in range(0, len(x), 1000):
            emb = F.normalize(model.encode_image(_normalise(x[i : i + 1000])).float(), dim=-1)
            correct += int((emb @ cls.t()).argmax(1).eq(y[i : i + 1000]).sum())
        model.train(was_training)
        return correct / max(1, len(x))


# --------------------------------------------------------------------------- evaluation through pand's teacher path


def zero_shot_accuracy(teacher: Any, dataset: Any, template: str = EVAL_TEMPLATE, batch_size: int = 1000) -> float:
    """Top-1 of ``teacher`` on ``dataset`` with ``eval_transform(32, 32)`` images and one template."""
    import torch

    from pand.data.transforms import eval_transform

    with torch.no_grad():
        transform = eval_transform(IMAGE_SIZE, IMAGE_SIZE)
        cls = teacher.class_embeddings(list(dataset.classes), [template])
        targets = torch.as_tensor(list(dataset.targets), dtype=torch.int64)
        correct = 0
        for start in range(0, len(dataset), batch_size):
            stop = min(len(dataset), start + batch_size)
            images = torch.stack([transform(dataset.load_image(i)) for i in range(start, stop)]).to(teacher.device)
            pred = (teacher.encode_images(images) @ cls.t()).argmax(1).cpu()
            correct += int(pred.eq(targets[start:stop]).sum())
        return correct / max(1, len(dataset))


# --------------------------------------------------------------------------- fit


def fit_teacher(
    out_path: str | Path,
    *,
    data_root: str | Path | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = DEFAULT_SEED,
    device: str = "cpu",
    progress: bool = True,
    num_threads: int = DEFAULT_NUM_THREADS,
) -> dict[str, Any]:
    """Fit ``pand-fmnist-clip`` on the Fashion-MNIST train split; write float16 safetensors + a JSON report.

    Returns the report (also written to :func:`report_path` ``(out_path)``): architecture, params, epochs, seconds
    (fitting time), seed, val_top1 / test_top1 (zero-shot, through ``load_clip_teacher`` on the written file) and
    provenance (recipe, sizes, digests, versions).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        return _fit(out_path, data_root, epochs, batch_size, lr, seed, device, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    out_path: str | Path,
    data_root: str | Path | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    import open_clip
    import safetensors.torch
    import torch
    import torch.nn.functional as F

    from pand.data import get_dataset
    from pand.data import fashion_mnist as fmnist
    from pand.teachers.clip import load_clip_teacher
    from pand.teachers.clip_training import clip_optimizer, warmup_cosine

    out_path = Path(out_path)
    root = str(data_root) if data_root is not None else str(fmnist.SYSTEM_DIR)
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False)

    train = get_dataset("fashion_mnist", root, "train")
    val = get_dataset("fashion_mnist", root, "val")
    test = get_dataset("fashion_mnist", root, "test")
    classes = list(train.classes)
    n_cls, n_tmpl = len(classes), len(TEMPLATES)

    x_train, y_train = _grey_uint8(train)
    x_train = _resize_uint8(x_train)
    x_val, y_val = _grey_uint8(val)
    x_val = _resize_uint8(x_val)

    torch.manual_seed(seed)
    model = _build_model().to(device)
    model.train()
    tokenizer = open_clip.get_tokenizer(ARCHITECTURE)
    tokens = tokenizer([t.format(c) for c in classes for t in TEMPLATES]).to(device)  # index c * T + t
    eval_tokens = tokenizer([EVAL_TEMPLATE.format(c) for c in classes]).to(device)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    max_log_scale = math.log(MAX_LOGIT_SCALE)

    gen = torch.Generator().manual_seed(seed)
    n = len(x_train)
    bs = min(int(batch_size), n)
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch
    total = steps_per_epoch * epochs
    opt = clip_optimizer(model, lr, WEIGHT_DECAY)

    say(
        f"fitting {ARCHITECTURE} on {n} Fashion-MNIST train images: {epochs} epochs x {steps_per_epoch} steps "
        f"of {bs}, lr {lr}, seed {seed}"
    )
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * bs : (k + 1) * bs]
            images = _normalise(_augment(x_train[idx], gen)).to(device)
            labels = y_train[idx].to(device)
            tidx = torch.randint(0, n_tmpl, (len(idx),), generator=gen).to(device)
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, lr=lr, total=total)
            img = F.normalize(model.encode_image(images), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1).view(n_cls, n_tmpl, -1)
            loss = _contrastive_loss(img, txt, labels, tidx, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)
            running += float(loss.detach())
            step += 1
        entry = {
            "epoch": epoch + 1,
            "loss": running / steps_per_epoch,
            "val_top1": _quick_accuracy(model, eval_tokens, x_val.to(device), y_val.to(device)),
            "seconds": time.perf_counter() - t0,
            "logit_scale": float(model.logit_scale.detach().exp()),
        }
        history.append(entry)
        say(
            f"epoch {epoch + 1}/{epochs}: loss {entry['loss']:.4f}  val zero-shot top-1 {entry['val_top1']:.4f}  "
            f"logit scale {entry['logit_scale']:.1f}  ({entry['seconds']:.0f} s)"
        )
    seconds = time.perf_counter() - t0

    model.eval()
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    params = int(sum(p.numel() for p in model.parameters()))
    atomic_write_bytes(
        out_path,
        # one metadata key only: safetensors writes its metadata map in hash order, which varies between processes
        safetensors.torch.save(state, metadata={"format": "pt"}),
    )

    teacher = load_clip_teacher(ARCHITECTURE, str(out_path), device=device)
    t1 = time.perf_counter()
    val_top1 = zero_shot_accuracy(teacher, val)
    test_top1 = zero_shot_accuracy(teacher, test)
    say(f"zero-shot top-1 of the written teacher: val {val_top1:.4f}  test {test_top1:.4f}")

    config_file = Path(__file__).parent / "model_configs" / f"{ARCHITECTURE}.json"
    report = {
        "architecture": ARCHITECTURE,
        "model_config": json.loads(config_file.read_text()),
        "params": params,
        "embed_dim": teacher.embed_dim,
        "dtype": "float16",
        "epochs": int(epochs),
        "batch_size": bs,
        "lr": float(lr),
        "weight_decay": WEIGHT_DECAY,
        "seed": int(seed),
        "seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_split": "train",
        "train_size": n,
        "val_size": len(val),
        "test_size": len(test),
        "templates": list(TEMPLATES),
        "eval_template": EVAL_TEMPLATE,
        "classes": classes,
        "val_top1": val_top1,
        "test_top1": test_top1,
        "history": history,
        "final_logit_scale": float(teacher.model.logit_scale.exp()),
        "weights_digest": teacher.identity["weights"],
        "file_sha256": file_sha256(out_path),
        "file_bytes": out_path.stat().st_size,
        "versions": {
            "torch": torch.__version__,
            "open_clip": getattr(open_clip, "__version__", "unknown"),
            "python": platform.python_version(),
        },
    }
    atomic_write_json(report_path(out_path), report)
    return report
