"""Teacher image embeddings of a dataset split, computed once and stored with their provenance.

Stage 1 of PAND (CoOp prompt learning) trains on these instead of images, so no image is decoded and the image tower
never runs while prompts are learned. The embeddings use the teacher's own evaluation preprocessing (resize, centre
crop, its mean and std), no augmentation.

``features.precision`` (``fp32``, the default; ``bf16``; ``fp16``) runs the image tower under autocast; the first batch
is then also computed in fp32 and the pass is refused unless they agree within ``features.precision_tolerance``
(see :mod:`pand.teachers.precision`: bf16 agrees to about 1 %, 20-45x float16 storage's own error; fp16 to 2-6x
it). The precision and the measured agreement are stored in the file's record.

The record also holds a digest of each tensor (:func:`pand.cache.integrity.tensor_digests`), compared whenever the
file is read: a file altered in place is refused by name (recomputed with ``features.rebuild=true``). A file written
before digests were recorded has none and is accepted as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pand.cache.integrity import TENSOR_DIGESTS, check_tensor_digests, tensor_digests
from pand.data import ClassificationDataset
from pand.data.transforms import eval_transform
from pand.errors import MismatchError, PandError
from pand.logs import tracked
from pand.provenance import check_provenance, load_record, load_tensors, save_tensors
from pand.teachers import ClipTeacher
from pand.teachers.precision import DEFAULT_TOLERANCE, AgreementProbe, teacher_autocast

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


#: Stored in a feature file's record but not compared: how a low-precision pass measured against fp32.
AGREEMENT_KEY = "agreement"


def feature_record(teacher: ClipTeacher, dataset: ClassificationDataset, precision: str = "fp32") -> dict[str, Any]:
    """What identifies a feature file: teacher, exact samples, preprocessing, class list and, unless it is fp32, the
    precision of the teacher pass (so that every fp32 file written before precisions existed still matches)."""
    record = {
        "kind": "teacher_image_features",
        "teacher": teacher.identity,
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_samples": len(dataset),
        "preprocessing": teacher_preprocessing(teacher),
        "classes": list(dataset.classes),
    }
    if precision != "fp32":
        record["precision"] = precision
    return record


def _encode(teacher: ClipTeacher, images: torch.Tensor, precision: str) -> torch.Tensor:
    with teacher_autocast(images.device, precision):
        return teacher.encode_images(images)


@torch.no_grad()
def extract_features(
    teacher: ClipTeacher, dataset: ClassificationDataset, *, batch_size: int = 64, num_workers: int = 0,
    progress: bool = True, precision: str = "fp32", tolerance: float = DEFAULT_TOLERANCE,
    probe: AgreementProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised teacher image embeddings [N, D] (float32) and labels [N] of every item, in order.

    ``precision`` other than fp32: under autocast, the first batch checked against fp32 within ``tolerance``
    (:class:`~pand.errors.PrecisionError` otherwise); pass your own ``probe`` to read the measured stats afterwards
    (it then replaces ``precision`` and ``tolerance``).
    """
    if probe is None:
        probe = AgreementProbe(precision, tolerance, what=f"teacher features of {dataset.name}/{dataset.split}",
                               setting="features")
    pp = teacher_preprocessing(teacher)
    transform = eval_transform(pp["image_size"], pp["resize_size"], tuple(pp["mean"]), tuple(pp["std"]))
    loader = DataLoader(_Images(dataset, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    embeds, labels = [], []
    device = teacher.device
    with tracked(loader, progress, description=f"teacher features {dataset.name}/{dataset.split}") as batches:
        for images, y in batches:
            images = images.to(device)
            embeds.append(probe(lambda p, images=images: _encode(teacher, images, p)).float().cpu())
            labels.append(y)
    return torch.cat(embeds), torch.cat(labels)


def ensure_features(
    path: str | Path, teacher: ClipTeacher, dataset: ClassificationDataset, *, rebuild: bool = False,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True, precision: str = "fp32",
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the stored features at ``path`` if they were made by this teacher for these samples; else compute them.

    A file made with another teacher, data, preprocessing, class list or ``precision``, or whose tensors no longer
    match the digests in its record, is refused with the reason, unless ``rebuild`` asks to replace it. A
    low-precision pass that does not agree with fp32 within ``tolerance`` is refused before the file is written (an
    existing file is left as it was); its measured agreement is stored in the record (:data:`AGREEMENT_KEY`, see
    :func:`stored_agreement`).
    """
    path = Path(path)
    expected = feature_record(teacher, dataset, precision)
    if path.is_file():
        tensors, stored = load_tensors(path)
        keys = sorted((set(stored) | set(expected)) - {AGREEMENT_KEY, TENSOR_DIGESTS})
        hint = "Pass features.rebuild=true to recompute it."
        if stored.get("precision") != expected.get("precision"):
            hint = (f"It was made with features.precision={stored.get('precision', 'fp32')}, this run asks for "
                    f"{precision}: set features.precision to match, or pass features.rebuild=true to recompute it.")
        try:
            check_provenance(path, stored, expected, keys=keys, hint=hint)
            check_tensor_digests(path, tensors, stored, hint="pass features.rebuild=true to recompute it")
            return tensors["embeds"].float(), tensors["labels"].long()
        except PandError as err:  # made for something else (MismatchError), or altered in place
            if not rebuild:
                raise
            why = ("it was made for something else" if isinstance(err, MismatchError)
                   else "its tensors do not match the digests in its record")
            log.warning("rebuilding %s: %s", path, why)
    probe = AgreementProbe(precision, tolerance, what=f"teacher features of {dataset.name}/{dataset.split} ({path})",
                           setting="features")
    embeds, labels = extract_features(teacher, dataset, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress, probe=probe)
    record = expected if probe.stats is None else {**expected, AGREEMENT_KEY: probe.stats}
    tensors = {"embeds": embeds, "labels": labels}
    save_tensors(path, tensors, {**record, TENSOR_DIGESTS: tensor_digests(tensors)})
    return embeds, labels


def stored_agreement(path: str | Path) -> dict[str, Any] | None:
    """The measured fp32 agreement stored with a low-precision feature file (None for fp32 or no such file); reads
    the record only, not the tensors."""
    path = Path(path)
    return load_record(path).get(AGREEMENT_KEY) if path.is_file() else None
