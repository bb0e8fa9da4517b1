"""The data side of `pand cache build`: views per second the build can feed its teacher, per view path and worker count.

A teacher cache build loads every training image once and makes K views of it for the teacher. On a GPU in bf16 the
teacher is fast, so the CPU side can limit the build. This script times `TeacherCache.build` with a stand-in teacher
that costs almost nothing (the mean colour of each view, projected to 64 dimensions), so the figure is the views/s of
the data side alone: `data.augment_on` cpu or device (the batched views run on `--device`), `cache.num_workers` 0 or
N, images read from JPEGs or from the decoded-image cache; all in one run, one configuration after the other.

    python benchmarks/cache_build_views.py [--images 256] [--views 4] [--workers 0 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pand.cache.images import with_decoded_cache
from pand.bench.loader import make_jpegs
from pand.cache.teacher import TeacherCache, cache_record
from pand.data.transforms import AugmentConfig, ReplayableAugment
from pand.teachers.source import IMAGE_EMBEDS

DIM = 64


class MeanColour(nn.Module):
    """A stand-in teacher: each view's mean colour through a fixed random projection (normalised), ~free to run."""

    provides = frozenset({IMAGE_EMBEDS})

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, DIM)

    def forward(self, batch, keys):
        return {IMAGE_EMBEDS: nn.functional.normalize(self.proj(batch["image"].mean(dim=(2, 3))), dim=-1)}


def build_once(folder: Path, dataset, augment, views: int, augment_on: str, workers: int, device: str,
               batch_size: int) -> float:
    source = MeanColour().to(device)
    record = cache_record(teacher_spec={"kind": "stand-in"}, dataset=dataset, augment=augment, views=views, seed=0,
                          templates=["{}"])
    text = torch.nn.functional.normalize(torch.randn(len(dataset.classes), DIM), dim=-1)
    start = time.perf_counter()
    TeacherCache.build(folder, record, dataset, augment, source, text, {"model": "stand-in"}, embed_dim=DIM,
                       learned_logit_scale=100.0, batch_size=batch_size, progress=False, augment_on=augment_on,
                       num_workers=workers)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    augment = ReplayableAugment(AugmentConfig(image_size=args.image_size,
                                              resize_size=round(args.image_size * 256 / 224)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jpegs = make_jpegs(root / "jpegs", args.images, 375, 500)
        decoded = with_decoded_cache(jpegs, root / "decoded", augment.config.resize_size, progress=False)
        print(f"{args.images} JPEGs 375x500, {args.views} views each ({args.images * args.views} views), "
              f"{args.image_size} px, batch {args.batch_size}, stand-in teacher on {args.device}, "
              f"{torch.get_num_threads()} torch threads")
        print("| images from | augment_on | workers | seconds | views/s |")
        print("| --- | --- | ---: | ---: | ---: |")
        run = 0
        for source, dataset in (("JPEG", jpegs), ("decoded cache", decoded)):
            for augment_on in ("cpu", "device"):
                for workers in args.workers:
                    run += 1
                    seconds = build_once(root / f"cache-{run}", dataset, augment, args.views, augment_on, workers,
                                         args.device, args.batch_size)
                    print(f"| {source} | {augment_on} | {workers} | {seconds:.2f} | "
                          f"{args.images * args.views / seconds:,.1f} |")


if __name__ == "__main__":
    main()
