"""``pand predict``: the top-k classes of image files under a distilled student.

Images are a file, a folder (searched recursively for image files) or a glob pattern; they are decoded, preprocessed
as in evaluation and classified in batches with a progress bar. A closed-set student names its own classes; an
open-vocabulary student takes any class names (``classes=[a,b,c]`` or ``classes_file=names.txt``, one per line), made
into its classifier once by the teacher's text tower. Results go to a CSV (one row per image and rank) or JSON file,
or to stdout.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pand.data.base import open_rgb
from pand.data.walk import check_input_root
from pand.data.walk import glob as walk_glob
from pand.data.walk import listed, reads, walk
from pand.deploy import load_student
from pand.errors import ConfigError
from pand.io import atomic_write_json, atomic_write_text
from pand.logs import tracked
from pand.rules import PREDICTION_SUFFIXES, read_class_names, resolve_device, validate_predict_options
from pand.spreadsheet import spreadsheet_cell

OUTPUT_SUFFIXES = PREDICTION_SUFFIXES
__all__ = ["find_images", "format_predictions", "predict", "read_class_names", "write_predictions"]

log = logging.getLogger("pand")


def find_images(spec: str | os.PathLike) -> list[Path]:
    """The image files ``spec`` names: one file, every image under a folder (sorted), or a glob's matches.

    Folders and globs are searched by :func:`pand.data.walk.walk`: a link loop is refused rather than followed
    forever, a file reached under two names is listed once, and pand's own output folders are skipped. Image files of
    a type pand does not read are named in a warning, so that a missing row is never a surprise.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        check_input_root(path, "images")
        listing = walk(path)
        _warn_unread(spec, [path / p for p in listing.unread_images()])
        if not listing.files:
            raise ConfigError(f"images={spec}: the folder holds no image file pand reads ({reads()}); it holds "
                              f"{listing.types_held()}")
        return sorted(path / p for p in listing.files)
    files, unread = walk_glob(os.path.expanduser(str(spec)))
    _warn_unread(spec, unread)
    if not files:
        if unread:
            raise ConfigError(f"images={spec} matches only image files of a type pand does not read: "
                              f"{listed(unread)}; pand reads {reads()}")
        raise ConfigError(f"images={spec} is neither an image file, a folder nor a glob matching image files")
    return sorted(files)


def _warn_unread(spec: str | os.PathLike, unread: list[Path]) -> None:
    if unread:
        log.warning("images=%s: %d image file%s of a type pand does not read (it reads %s) left out: %s", spec,
                    len(unread), "s" if len(unread) > 1 else "", reads(), listed(unread))


class _Files(Dataset):
    def __init__(self, files: list[Path], preprocess) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(open_rgb(self.files[i]))  # a corrupt file raises an error naming its path


def predict(ckpt_path: str | os.PathLike, images: str | os.PathLike, *, topk: int = 5,
            classes: Sequence[str] | str | None = None, classes_file: str | None = None, out: str | None = None,
            batch_size: int = 64, num_workers: int = 0, device: str = "auto",
            progress: bool | None = None) -> list[dict[str, Any]]:
    """Top-``topk`` (label, probability) per image; written to ``out`` (.csv or .json) when given.

    Every argument is checked before the model is loaded, the folder of ``out`` included, so that predictions are
    never computed and then lost."""

    names = validate_predict_options({"ckpt_path": ckpt_path, "images": images, "topk": topk, "classes": classes,
                                      "classes_file": classes_file, "out": out, "batch_size": batch_size,
                                      "num_workers": num_workers, "device": str(device)})
    files = find_images(images)
    device = resolve_device(device)
    loaded = load_student(ckpt_path, names, device=device)
    k = min(int(topk), len(loaded.class_names))
    loader = DataLoader(_Files(files, loaded.preprocess), batch_size=int(batch_size), num_workers=int(num_workers))
    if progress is None:
        progress = sys.stderr.isatty()
    rows: list[dict[str, Any]] = []
    done = 0
    with torch.inference_mode(), tracked(loader, bool(progress), description="predict",
                                         console=_stderr_console() if progress else None) as batches:
        for batch in batches:
            probs = loaded.model(batch.to(device)).float().softmax(dim=-1).cpu()
            top_p, top_i = probs.topk(k, dim=-1)
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist()):
                rows.append({"image": str(files[done]),
                             "top": [{"label": loaded.class_names[i], "probability": p} for p, i in zip(p_row, i_row)]})
                done += 1
    if out is not None:
        write_predictions(rows, out)
    return rows


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def write_predictions(rows: list[dict[str, Any]], out: str | os.PathLike) -> None:
    """CSV (``image, rank, label, probability``, one row per image and rank) or JSON (the rows as they are).

    Text cells of the CSV (image paths, class names) that a spreadsheet would run as a formula are escaped
    (:func:`pand.spreadsheet.spreadsheet_cell`); the JSON keeps every name exactly."""

    out = Path(out).expanduser()
    if out.suffix.lower() == ".json":
        atomic_write_json(out, rows)
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "rank", "label", "probability"])
    for row in rows:
        for rank, top in enumerate(row["top"], start=1):
            writer.writerow([spreadsheet_cell(row["image"]), rank, spreadsheet_cell(top["label"]),
                             f"{top['probability']:.6f}"])
    atomic_write_text(out, buf.getvalue())


def format_predictions(rows: list[dict[str, Any]], limit: int = 20) -> str:
    """A few lines for the terminal: each image with its top labels and probabilities."""
    lines = []
    for row in rows[:limit]:
        tops = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in row["top"])
        lines.append(f"{row['image']}: {tops}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more images")
    return "\n".join(lines)
