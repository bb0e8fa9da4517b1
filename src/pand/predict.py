"""``pand predict``: the top-k classes of image files under a distilled student.

Images are a file, a folder (searched recursively for image files) or a glob pattern; they are decoded, preprocessed
as in evaluation and classified in batches with a progress bar. A closed-set student names its own classes; an
open-vocabulary student takes any class names (``classes=[a,b,c]`` or ``classes_file=names.txt``, one per line), made
into its classifier once by the teacher's text tower. Results go to a CSV (one row per image and rank) or JSON file,
or to stdout.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pand.data.base import is_image_file, open_rgb
from pand.errors import ConfigError

OUTPUT_SUFFIXES = (".csv", ".json")


def find_images(spec: str | os.PathLike) -> list[Path]:
    """The image files ``spec`` names: one file, every image under a folder (sorted), or a glob's matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name))
        if not found:
            raise ConfigError(f"images={spec}: the folder holds no image files (.jpg, .png, ...)")
        return found
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(spec)), recursive=True))
    files = [p for p in matches if p.is_file() and is_image_file(p.name)]
    if not files:
        raise ConfigError(f"images={spec} is neither an image file, a folder nor a glob matching image files")
    return files


def read_class_names(classes: Sequence[str] | str | None, classes_file: str | os.PathLike | None) -> list[str] | None:
    """Class names from ``classes`` (a list, or one comma-separated string) or a file with one name per line."""
    if classes is not None and classes_file is not None:
        raise ConfigError("give classes=... or classes_file=..., not both")
    if classes_file is not None:
        path = Path(classes_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"classes_file={classes_file} does not exist")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif classes is None:
        return None
    elif isinstance(classes, str):
        names = [c.strip() for c in classes.split(",") if c.strip()]
    else:
        names = [str(c).strip() for c in classes if str(c).strip()]
    if not names:
        raise ConfigError("the list of class names is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"class names must be distinct; repeated: {', '.join(duplicates)}")
    return names


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
    """Top-``topk`` (label, probability) per image; written to ``out`` (.csv or .json) when given."""
    from pand.deploy import load_student
    from pand.io import check_writable

    if int(topk) < 1:
        raise ConfigError(f"topk={topk} is not allowed: expected an integer >= 1")
    if out is not None:
        if Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"out={out}: the file name must end in .csv or .json")
        check_writable(Path(out).expanduser().absolute().parent, "the output folder of out=")
    files = find_images(images)
    names = read_class_names(classes, classes_file)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    loaded = load_student(ckpt_path, names, device=device)
    k = min(int(topk), len(loaded.class_names))
    loader = DataLoader(_Files(files, loaded.preprocess), batch_size=int(batch_size), num_workers=int(num_workers))
    if progress is None:
        progress = sys.stderr.isatty()
    batches = loader
    if progress:
        from rich.progress import track

        batches = track(loader, description="predict", console=_stderr_console())
    rows: list[dict[str, Any]] = []
    done = 0
    with torch.inference_mode():
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
    """CSV (``image, rank, label, probability``, one row per image and rank) or JSON (the rows as they are)."""
    from pand.io import atomic_write_json, atomic_write_text

    out = Path(out).expanduser()
    if out.suffix.lower() == ".json":
        atomic_write_json(out, rows)
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "rank", "label", "probability"])
    for row in rows:
        for rank, top in enumerate(row["top"], start=1):
            writer.writerow([row["image"], rank, top["label"], f"{top['probability']:.6f}"])
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
