"""Two-way image-caption retrieval on a captioned test split, for the open-vocabulary report (``open_vocab.json``).

The COCO / Flickr protocol, as clip_benchmark computes it (``metrics/zeroshot_retrieval.py``): every image and every
caption of the split, the similarity ``S[i, j]`` of image ``i`` and caption ``j``:

* ``image_retrieval_recall@K`` (text -> image): each caption ranks all the images; a hit when its own image is among
  the K most similar; the share of captions with a hit;
* ``text_retrieval_recall@K`` (image -> text): each image ranks all the captions; a hit when any of its captions (COCO
  has about 5) is among the K most similar; the share of images with a hit.

A K beyond the gallery counts the whole gallery. Ties are ranked by ``torch.topk``, as clip_benchmark does.

The student (any head, with or without text fusion) and the teacher are measured on the same images and captions:
each caption is encoded by the teacher's text tower as it is (no template), the teacher sees the images with its own
evaluation preprocessing, the student with the run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from pand.data import ClassificationDataset
from pand.engine.data import EvalItems
from pand.stage1.features import extract_features

RECALL_AT = (1, 5, 10)
#: The captions count as one template-free prompt each.
CAPTION_TEMPLATE = "{}"


def flatten(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Every caption of every image in image order, and the image each belongs to."""
    texts = [t for image in captions for t in image]
    owner = torch.tensor([i for i, image in enumerate(captions) for _ in image], dtype=torch.long)
    return texts, owner


def retrieval_recalls(similarity: torch.Tensor, caption_image: torch.Tensor,
                      ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """clip_benchmark's ``image_retrieval_recall@K`` and ``text_retrieval_recall@K`` from an ``[N images, M captions]``
    similarity, caption ``j`` belonging to image ``caption_image[j]``."""
    sim = similarity.float()
    n, m = sim.shape
    owner = caption_image.long()
    if owner.shape != (m,) or (m and not (0 <= int(owner.min()) and int(owner.max()) < n)):
        raise ValueError(f"caption_image must give each of the {m} captions an image among {n}")
    positive = torch.zeros(n, m, dtype=torch.bool)
    positive[owner, torch.arange(m)] = True
    out: dict[str, float] = {}
    for k in ks:
        # text -> image: a caption's K best images hold its own
        top_images = sim.t().topk(min(k, n), dim=1).indices  # [M, k]
        out[f"image_retrieval_recall@{k}"] = float((top_images == owner.unsqueeze(1)).any(1).float().mean())
        # image -> text: an image's K best captions hold one of its own
        top_captions = sim.topk(min(k, m), dim=1).indices  # [N, k]
        out[f"text_retrieval_recall@{k}"] = float(positive.gather(1, top_captions).any(1).float().mean())
    return out


@torch.no_grad()
def _student_similarity(student, dataset: ClassificationDataset, transform, text: torch.Tensor,
                        tokens: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device,
                        batch_size: int, num_workers: int) -> torch.Tensor:
    """``[N, M]``: the student's cosine of every image with every caption (fused per pair with text fusion)."""
    loader = DataLoader(EvalItems(dataset, transform), batch_size=batch_size, num_workers=num_workers)
    text, tokens, mask = (None if t is None else t.to(device) for t in (text, tokens, mask))
    return torch.cat([student.similarity(student.visual_tokens(batch["image"].to(device)), text, tokens, mask)
                      .float().cpu() for batch in loader])


def caption_retrieval(student, teacher, dataset: ClassificationDataset, captions: Sequence[Sequence[str]],
                      transform, *, batch_size: int, num_workers: int) -> dict[str, Any]:
    """Both directions' recall@1/5/10 of the student and of the teacher on ``dataset`` with its ``captions``:
    ``{"images": N, "captions": M, "student": {...}, "teacher": {...}}``.

    ``student`` is an open-vocabulary student (in eval mode, on its device), ``teacher`` the CLIP teacher whose text
    tower embeds the captions and whose image tower is the reference; ``transform`` the student's evaluation
    preprocessing."""
    texts, owner = flatten(captions)
    text = teacher.caption_embeddings(texts).float().cpu()
    tokens = mask = None
    if getattr(student, "fusion_kind", "none") == "cross_attention":
        tokens, mask = teacher.class_token_features(texts, [CAPTION_TEMPLATE])
    device = next(student.parameters()).device
    s_sim = _student_similarity(student, dataset, transform, text, tokens, mask, device, batch_size, num_workers)
    t_img, _ = extract_features(teacher, dataset, batch_size=batch_size, num_workers=num_workers, progress=False)
    t_sim = t_img.float().cpu() @ text.t()
    return {"images": len(captions), "captions": len(texts),
            "student": retrieval_recalls(s_sim, owner), "teacher": retrieval_recalls(t_sim, owner)}


def add_caption_retrieval(report: dict[str, Any], student, teacher, dataset: ClassificationDataset,
                          captions: Sequence[Sequence[str]], transform, *, split: str, batch_size: int,
                          num_workers: int) -> None:
    """Put the caption retrieval of ``dataset`` into an open-vocabulary report: ``report["captions"]`` says what was
    measured, ``report[who]["captions"]`` holds the recalls of the student and of the teacher (the keys clip_benchmark
    writes, so that the report's clip_benchmark records include them). The student's mode is left as it was."""
    was_training = student.training
    student.eval()
    try:
        found = caption_retrieval(student, teacher, dataset, captions, transform, batch_size=batch_size,
                                  num_workers=num_workers)
    finally:
        student.train(was_training)
    report["captions"] = {"split": split, "images": found["images"], "captions": found["captions"],
                          "protocol": "COCO: text->image counts a caption's own image in the top K; image->text "
                                      "counts any of the image's captions in the top K"}
    for who in ("student", "teacher"):
        report.setdefault(who, {})["captions"] = found[who]


def format_caption_retrieval(report: Mapping[str, Any]) -> list[str]:
    """The caption retrieval of a report as aligned lines (none when it has none)."""
    info = report.get("captions")
    if not isinstance(info, Mapping):
        return []
    columns = [f"{d} R@{k}" for d in ("text->image", "image->text") for k in RECALL_AT]
    lines = [f"caption retrieval (%), {info['split']} split: {info['images']} images, {info['captions']} captions",
             " " * 28 + "".join(f"{c:>18}" for c in columns)]
    for who in ("student", "teacher"):
        r = report[who]["captions"]
        values = [r[f"{'image' if d == 'text->image' else 'text'}_retrieval_recall@{k}"]
                  for d in ("text->image", "image->text") for k in RECALL_AT]
        lines.append(f"  {who:<26}" + "".join(f"{100 * v:18.1f}" for v in values))
    return lines
