"""Teacher image embeddings of a dataset split, computed once and stored with their provenance.

Stage 1 of PAND (CoOp prompt learning) trains on these instead of images, so no image is decoded and the image tower
never runs while prompts are learned. The embeddings use the teacher's own evaluation preprocessing (resize, centre
crop, its mean and std), no augmentation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pand.data import ClassificationDataset
from pand.data.transforms import eval_transform
from pand.errors import MismatchError
from pand.provenance import check_provenance, load_tensors, save_tensors
from pand.teachers import ClipTeacher

log = logging.getLogger(__name__)


class _Images(Dataset):
    def __init__(self, dataset: ClassificationDataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset.load_image(i)), self.dataset.targets[i]


def teacher_preprocessing(teacher: ClipTeacher) -> dict[str, Any]:
    return {"image_size": teacher.image_size, "resize_size": teacher.image_size, "mean": list(teacher.mean),
            "std": list(teacher.std), "crop": "center"}


def feature_record(teacher: ClipTeacher, dataset: ClassificationDataset) -> dict[str, Any]:
    """What identifies a feature file: teacher, exact samples, preprocessing and class list."""
    return {
        "kind": "teacher_image_features",
        "teacher": teacher.identity,
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_samples": len(dataset),
        "preprocessing": teacher_preprocessing(teacher),
        "classes": list(dataset.classes),
    }


@torch.no_grad()
def extract_features(
    teacher: ClipTeacher, dataset: ClassificationDataset, *, batch_size: int = 64, num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised teacher image embeddings [N, D] (float32) and labels [N] of every item, in order."""
    pp = teacher_preprocessing(teacher)
    transform = eval_transform(pp["image_size"], pp["resize_size"], tuple(pp["mean"]), tuple(pp["std"]))
    loader = DataLoader(_Images(dataset, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    embeds, labels = [], []
    device = teacher.device
    iterator = loader
    if progress:
        from rich.progress import track

        iterator = track(loader, description=f"teacher features {dataset.name}/{dataset.split}")
    for images, y in iterator:
        embeds.append(teacher.encode_images(images.to(device)).cpu())
        labels.append(y)
    return torch.cat(embeds), torch.cat(labels)


def ensure_features(
    path: str | Path, teacher: ClipTeacher, dataset: ClassificationDataset, *, rebuild: bool = False,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the stored features at ``path`` if they were made by this teacher for these samples; else compute them.

    A file made with another teacher, data, preprocessing or class list is refused with the reason, unless
    ``rebuild`` asks to replace it.
    """
    path = Path(path)
    expected = feature_record(teacher, dataset)
    if path.is_file():
        tensors, stored = load_tensors(path)
        try:
            check_provenance(path, stored, expected, hint="Pass features.rebuild=true to recompute it.")
            return tensors["embeds"].float(), tensors["labels"].long()
        except MismatchError:
            if not rebuild:
                raise
            log.warning("rebuilding %s: it was made for something else", path)
    embeds, labels = extract_features(teacher, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress)
    save_tensors(path, {"embeds": embeds, "labels": labels}, expected)
    return embeds, labels
