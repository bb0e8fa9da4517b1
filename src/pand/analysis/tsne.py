"""t-SNE of student features: compare how students (e.g. w/o KD, VL2Lite, PAND) arrange the classes of a split.

    pand tsne CKPT_A CKPT_B ... --labels "w/o KD,VL2Lite,PAND" --out DIR [--split test] [--perplexity 30]
              [--max-samples N] [data.root=...]

Writes ``tsne_compare.png`` (one panel per checkpoint, side by side) and ``tsne_<i>_<label>.png`` per checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pand.analysis.sweep import save_figure
from pand.arguments import ArgumentParser
from pand.config import with_data_overrides
from pand.errors import ConfigError, MismatchError
from pand.io import atomic_write_with

_MAX_LEGEND_CLASSES = 20


def student_features(
    ckpt_path: str | os.PathLike,
    split: str = "test",
    data_overrides: dict | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pooled student features ``[N, d]``, labels ``[N]`` and class names for every sample of ``split``, or for the
    seeded subset of ``max_samples`` of them that :func:`sample_indices` picks (only those images are read).

    The data module and the student are rebuilt from the config stored in the checkpoint (no teacher, no pretrained
    download); ``data_overrides`` changes the data section (e.g. ``{"root": ...}`` when the data moved).
    """
    return _features(ckpt_path, split, data_overrides, batch_size, device, max_samples, seed)[:3]


def _features(ckpt_path: str | os.PathLike, split: str, data_overrides: dict | None, batch_size: int | None,
              device: str, max_samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """:func:`student_features` (its arguments in its order), and the number of samples in the whole split."""
    import torch

    from pand.deploy import load_student
    from pand.engine.data import PandDataModule

    ckpt_path = Path(ckpt_path)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    loaded = load_student(ckpt_path, device=device)
    student, stored = loaded.model, loaded.config
    config = with_data_overrides(stored, data_overrides)
    if batch_size is not None:
        config["data"] = {**config["data"], "batch_size": int(batch_size)}
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    classes = data.classes
    if len(classes) != student.num_classes:
        raise MismatchError(f"{ckpt_path} classifies {student.num_classes} classes; its data has {len(classes)}")

    size = len(data.splits[split])
    indices = sample_indices(size, max_samples, seed)
    features, labels = [], []
    with torch.no_grad():
        for batch in data.eval_dataloader(split, indices):  # no drop_last: every sample asked for
            feats = student.features(batch["image"].to(device))
            features.append(feats.float().flatten(1).cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    n = size if indices is None else len(indices)
    if not features:
        raise ConfigError(f"the {split} split of {ckpt_path}'s data is empty")
    feats_np, labels_np = np.concatenate(features), np.concatenate(labels).astype(np.int64)
    assert len(feats_np) == n, f"read {len(feats_np)} features for {n} samples of the {split} split"
    return feats_np, labels_np, classes, size


def sample_indices(size: int, max_samples: int | None, seed: int) -> list[int] | None:
    """The sorted seeded subset of ``max_samples`` of a split's ``size`` samples (``None``: all of them), the same
    for every checkpoint of the same data, so that their panels show the same images."""
    if not max_samples or size <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(size, int(max_samples), replace=False)).tolist()


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:60] or "run"


def embed(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (PCA init) of ``features``; the perplexity is clamped below the number of samples."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 2:
        raise ConfigError(f"t-SNE needs at least 2 samples, got {n}")
    perplexity = min(float(perplexity), n - 1.0)  # sklearn requires perplexity < n_samples
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
    return tsne.fit_transform(np.asarray(features, dtype=np.float32))


def _scatter(ax, points: np.ndarray, labels: np.ndarray, num_classes: int, title: str) -> list:
    import matplotlib

    handles = []
    if num_classes <= _MAX_LEGEND_CLASSES:
        cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
        for c in range(num_classes):
            mask = labels == c
            handles.append(ax.scatter(points[mask, 0], points[mask, 1], s=10, color=cmap(c), label=str(c)))
    else:
        ax.scatter(points[:, 0], points[:, 1], s=4, c=labels, cmap="turbo", vmin=0, vmax=num_classes - 1)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return handles


@dataclass
class Embedding:
    """The 2-D t-SNE of one checkpoint's student features on a split: what one panel of the figures shows."""

    label: str  #: panel title
    points: np.ndarray  #: ``[n, 2]``
    labels: np.ndarray  #: ``[n]`` class indices
    classes: list[str]
    split: str

    def save(self, path: str | os.PathLike) -> Path:
        """Write to an ``.npz`` file (atomically; arrays and strings only, read back without unpickling)."""
        arrays = {"points": self.points.astype(np.float32), "labels": self.labels.astype(np.int64),
                  "classes": np.asarray(self.classes, dtype=str), "label": np.asarray(self.label),
                  "split": np.asarray(self.split)}
        return atomic_write_with(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embedding:
        with np.load(path, allow_pickle=False) as z:
            return cls(label=str(z["label"]), points=z["points"], labels=z["labels"],
                       classes=[str(c) for c in z["classes"]], split=str(z["split"]))


def embed_checkpoint(ckpt_path: str | os.PathLike, label: str, split: str = "test", perplexity: float = 30,
                     seed: int = 0, max_samples: int | None = None, **feature_kwargs: Any) -> Embedding:
    """t-SNE of one checkpoint's student features on ``split`` (``max_samples``: of the seeded subset that
    :func:`sample_indices` picks; ``feature_kwargs``: the rest of :func:`student_features`' arguments)."""
    feats, ys, classes = student_features(ckpt_path, split, max_samples=max_samples, seed=seed, **feature_kwargs)
    return Embedding(label, embed(feats, perplexity, seed), ys, classes, split)


def tsne_compare(
    ckpt_paths: Sequence[str | os.PathLike],
    labels: Sequence[str],
    out_dir: str | os.PathLike,
    split: str = "test",
    perplexity: float = 30,
    seed: int = 0,
    data_overrides: dict | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    max_samples: int | None = None,
) -> list[Path]:
    """t-SNE of each checkpoint's student features on ``split``; returns ``[tsne_compare.png, tsne_<i>_<label>.png...]``.

    ``max_samples`` embeds the same seeded random subset of the split for every checkpoint (t-SNE is quadratic in N),
    and only those images are read.

    Points are coloured by class (legend of class names up to 20 classes). All checkpoints must see the same number
    of samples (the same data), otherwise a MismatchError names the sizes.
    """
    ckpt_paths, labels = list(ckpt_paths), list(labels)
    if not ckpt_paths:
        raise ConfigError("tsne_compare needs at least one checkpoint")
    if len(ckpt_paths) != len(labels):
        raise ConfigError(
            f"{len(ckpt_paths)} checkpoint(s) but {len(labels)} label(s) ({', '.join(map(repr, labels))}); "
            "give one label per checkpoint"
        )
    runs = [_features(path, split, data_overrides, batch_size, device, max_samples, seed) for path in ckpt_paths]
    sizes = {str(p): size for p, (_, _, _, size) in zip(ckpt_paths, runs)}
    if len(set(sizes.values())) > 1:
        raise MismatchError(
            f"the checkpoints' {split} splits differ in size ({', '.join(f'{p}: {n}' for p, n in sizes.items())}); "
            "they were trained on different data - compare checkpoints of the same dataset (or pass data overrides)"
        )
    return plot_embeddings([Embedding(label, embed(feats, perplexity, seed), ys, classes, split)
                            for label, (feats, ys, classes, _) in zip(labels, runs)], out_dir)


def plot_embeddings(embeddings: Sequence[Embedding], out_dir: str | os.PathLike) -> list[Path]:
    """``tsne_compare.png`` (the panels side by side) and ``tsne_<i>_<label>.png`` (one each); returns their paths."""
    from matplotlib.figure import Figure

    if not embeddings:
        raise ConfigError("no t-SNE embedding to plot")
    sizes = {len(e.points) for e in embeddings}
    if len(sizes) > 1:
        raise MismatchError(f"the t-SNE embeddings hold different numbers of images ({sorted(sizes)}): they are not "
                            "of the same images")
    out_dir = Path(out_dir)
    classes, split, n = embeddings[0].classes, embeddings[0].split, len(embeddings[0].points)
    num_classes = max(len(classes), *(int(e.labels.max()) + 1 for e in embeddings))

    def legend(fig_or_ax, handles):
        if handles:
            names = [classes[c] if c < len(classes) else str(c) for c in range(len(handles))]
            fig_or_ax.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small",
                             markerscale=2, frameon=False)

    written: list[Path] = []
    k = len(embeddings)
    fig = Figure(figsize=(4.2 * k + (2.0 if num_classes <= _MAX_LEGEND_CLASSES else 0.0), 4.4))
    axes = fig.subplots(1, k, squeeze=False)[0]
    handles = []
    for ax, e in zip(axes, embeddings):
        handles = _scatter(ax, e.points, e.labels, num_classes, e.label)
    fig.suptitle(f"t-SNE of student features ({split}, {n} images, {num_classes} classes)")
    fig.tight_layout()
    legend(fig, handles)
    written.append(save_figure(fig, out_dir / "tsne_compare.png"))

    for i, e in enumerate(embeddings):
        fig = Figure(figsize=(5.5 if num_classes <= _MAX_LEGEND_CLASSES else 4.6, 4.6))
        ax = fig.add_subplot()
        legend(ax, _scatter(ax, e.points, e.labels, num_classes, f"{e.label} ({split}, {n} images)"))
        written.append(save_figure(fig, out_dir / f"tsne_{i}_{_slug(e.label)}.png"))
    return written


# --------------------------------------------------------------------------------------------------------------- CLI
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main_tsne(args: list[str]) -> int:
    """``pand tsne CKPT... --labels "a,b" --out DIR [--split test] [--perplexity 30] [data.KEY=VALUE...]``."""
    from omegaconf import OmegaConf

    parser = ArgumentParser(
        prog="pand tsne",
        description="t-SNE of the student features of checkpoints on one split, side by side "
                    "(tsne_compare.png) and one image per checkpoint (tsne_<i>_<label>.png).",
        epilog='example: pand tsne runs/ce/checkpoints/best.ckpt runs/pand/checkpoints/best.ckpt '
               '--labels "w/o KD,PAND" --out figs data.root=/data/cub',
    )
    parser.add_argument("items", nargs="+", metavar="CKPT_OR_OVERRIDE",
                        help="checkpoints, then optional data overrides such as data.root=/new/place "
                             "data.num_workers=0")
    parser.add_argument("--labels", default=None,
                        help="comma-separated panel titles, one per checkpoint (default: the run folder names)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--perplexity", type=float, default=30.0,
                        help="t-SNE perplexity (clamped below the number of samples)")
    parser.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="embed a seeded random subset of this many images of the split, the same for every "
                             "checkpoint (t-SNE time grows quadratically; default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="feature extraction batch size")
    parser.add_argument("--device", default="cpu", help="torch device for feature extraction (cpu, cuda, ...)")
    ns = parser.parse_intermixed_args(args)

    ckpts, overrides = [], []
    for item in ns.items:
        # Lightning checkpoint names may contain '=' (epoch=3.ckpt): an existing file is always a checkpoint.
        (overrides if _OVERRIDE.match(item) and not Path(item).is_file() else ckpts).append(item)
    if not ckpts:
        parser.error("give at least one checkpoint")
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        parser.error(f"only data.* overrides are accepted, got {', '.join(bad)}")
    data_overrides = OmegaConf.to_container(OmegaConf.from_dotlist(overrides)).get("data") if overrides else None
    if ns.labels is None:
        labels = [_default_label(Path(c)) for c in ckpts]
    else:
        labels = [s.strip() for s in ns.labels.split(",")]
    written = tsne_compare(ckpts, labels, ns.out, split=ns.split, perplexity=ns.perplexity, seed=ns.seed,
                           data_overrides=data_overrides, batch_size=ns.batch_size, device=ns.device,
                           max_samples=ns.max_samples)
    for path in written:
        print(path)
    return 0


def _default_label(ckpt: Path) -> str:
    return ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.stem
