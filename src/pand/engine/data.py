"""Batches for training and evaluation, as a Lightning data module.

A training item is a dict ``{image, label, index, labelled, aug}``: ``aug`` holds the parameters of the random
augmentation, drawn from a generator seeded by ``(seed, epoch, index)``, so the exact view can be rebuilt later (for
the teacher cache) and an interrupted run replays the same views after resuming. ``labelled`` is False for an
unlabelled training image (``data.unlabelled``; its label is -1): training then iterates over a
:class:`~pand.data.unlabelled.TrainingPool` with :class:`MixedEpochSampler` batches. When the training images have
captions (``data=captions``), an item also holds ``caption``: the row, in the run's
:class:`~pand.data.captions.CaptionTable`, of the one caption it trains with that epoch (-1 for an image without
any), chosen from ``(seed, epoch, index)`` alone like the view. Evaluation items are ``{image, label, index}``. The
datasets themselves come from :func:`pand.data.assembly.load_splits`.

pand shards batches across processes itself (``use_distributed_sampler=False``): the training sampler needs the epoch
to seed the views, and evaluation shards without the padding duplicates a ``DistributedSampler`` adds.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Sampler

from pand.cache.images import with_decoded_cache
from pand.cache.teacher import choose_view
from pand.data import ClassificationDataset, subset
from pand.data.assembly import UNLABELLED_SPLIT, classless, label_free, load_splits
from pand.data.captions import CaptionTable, captions_of, has_class_labels
from pand.data.device_augment import WINDOW, BatchedAugment, loader_share
from pand.data.transforms import (
    AugmentConfig,
    ReplayableAugment,
    eval_transform,
    image_hw,
    view_generator,
)
from pand.data.unlabelled import UNLABELLED, TeacherLabelled, TrainingPool
from pand.data.walk import input_folders, refuse_outputs_inside
from pand.errors import ConfigError
from pand.interrupts import ignore_stop_signals

log = logging.getLogger("pand")


class TrainViews(Dataset):
    """Training items keyed by ``(index, epoch)``: the image under its replayable augmentation.

    Without a teacher cache each (epoch, index) draws fresh parameters; with one, each epoch picks one of the K cached
    views of the image (item key ``view``) and rebuilds exactly that view from its stored parameters.

    With ``augment_on="device"`` an item carries the view's uint8 window (key ``window``, see
    :func:`~pand.data.device_augment.crop_window`) instead of the float view; :meth:`PandDataModule.on_after_batch_transfer`
    turns a batch of windows into views on the training device.
    """

    def __init__(
        self, dataset: ClassificationDataset, augment: ReplayableAugment, seed: int, teacher_cache=None,
        augment_on: str = "cpu", captions: CaptionTable | None = None,
    ) -> None:
        self.dataset = dataset
        self.augment = augment
        self.seed = int(seed)
        self.teacher_cache = teacher_cache
        self.augment_on = augment_on
        self.captions = captions
        self._make = loader_share(augment, augment_on)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        image = self.dataset.load_image(index)
        label = self.dataset.targets[index]
        item: dict[str, Any] = {"label": label, "index": index, "labelled": label != UNLABELLED}
        if self.captions is not None:
            item["caption"] = self.captions.choose(self.seed, epoch, index)
        if self.teacher_cache is None:
            item["aug"] = self.augment.sample(view_generator(self.seed, epoch, index), image_hw(image))
        else:
            view = choose_view(self.seed, epoch, index, self.teacher_cache.views)
            item["aug"] = self.teacher_cache.params(index, view)
            item["view"] = view
        item[WINDOW if self.augment_on == "device" else "image"] = self._make(image, item["aug"])
        return item


def init_worker(worker_id: int, rank: int) -> None:
    """A loader process: leave SIGINT / SIGTERM to the training process (it saves a checkpoint at the next step and
    shuts the workers down), and seed the RNGs as Lightning's own ``worker_init_fn`` would, which it adds only to
    loaders without one."""
    ignore_stop_signals()
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id, rank=rank)


class EvalItems(Dataset):
    def __init__(self, dataset: ClassificationDataset, transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.transform(self.dataset.load_image(index))
        return {"image": image, "label": self.dataset.targets[index], "index": index}


class EpochSampler(Sampler):
    """Shuffles per epoch (seeded), shards across ranks, and yields ``(index, epoch)`` keys.

    Not torch's ``DistributedSampler``: the dataset needs the epoch with each index (it draws the view of that epoch,
    the one the teacher cache stored), and a mid-epoch resume must skip what was already trained on, which torch's
    sampler cannot do.

    :meth:`resume_at` makes the next pass over a given epoch skip the items already trained on, so a run resumed from a
    mid-epoch checkpoint sees exactly the rest of that epoch.
    """

    def __init__(
        self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = True,
        shard_size: int | None = None,
    ) -> None:
        self.size, self.seed, self.shuffle = size, int(seed), shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        # Local shards (``cache.local_shards``): rank r draws only the images of the teacher cache's shards
        # s % world_size == r, the ones it built, so a node reads its share of the cache and no other.
        self.shard_size = int(shard_size) if shard_size and world_size > 1 else None
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, items_done: int) -> None:
        # The epoch too: with loader workers, Lightning starts iterating (the workers prefetch) before it sets the
        # resumed epoch, so the order and the skip must already be that epoch's.
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(items_done))

    def __len__(self) -> int:
        return self._per_rank(self.size)

    def _per_rank(self, size: int, offset: int = 0) -> int:
        """Items each rank gets of ``size`` (pool indices ``offset ..``): every rank the same number, as DDP needs."""
        if self.shard_size is not None:
            counts = [len(self._local(size, offset, r)) for r in range(self.world_size)]
            return min(counts) if self.drop_last else max(counts)
        if self.drop_last:
            return size // self.world_size
        return math.ceil(size / self.world_size)

    def _local(self, size: int, offset: int, rank: int) -> list[int]:
        """Of items ``0 .. size - 1`` (pool indices ``offset ..``), those in rank ``rank``'s cache shards."""
        if not size:
            return []
        first, last = offset // self.shard_size, (offset + size - 1) // self.shard_size
        mine: list[int] = []
        for s in range(first, last + 1):
            if s % self.world_size == rank:
                mine += range(max(s * self.shard_size, offset) - offset,
                              min((s + 1) * self.shard_size, offset + size) - offset)
        return mine

    def _permutation(self, size: int, salt: int = 0) -> list[int]:
        if not self.shuffle:
            return list(range(size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + salt * 1_000_003)
        return torch.randperm(size, generator=g).tolist()

    def _shard(self, order: list[int], n: int) -> list[int]:
        """This rank's ``n`` items of ``order`` (cut to, or padded up to, ``n * world_size`` first)."""
        total = n * self.world_size
        order = order[:total] if len(order) >= total else (order + order[: total - len(order)])
        return order[self.rank : total : self.world_size]

    def _share(self, size: int, n: int, offset: int = 0) -> list[int]:
        """This rank's ``n`` items of ``0 .. size - 1`` for the epoch: of a seeded permutation of all of them, or of
        its local shards' items only (cut to, or cycled up to, ``n``)."""
        if self.shard_size is None:
            return self._shard(self._permutation(size), n)
        local = self._local(size, offset, self.rank)
        order = [local[j] for j in self._permutation(len(local))]
        return (order * (n // max(1, len(order)) + 1))[:n] if order else []

    def _keys(self) -> list[int]:
        return self._share(self.size, len(self))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self._keys()
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] :]
        self._resume = None
        for index in mine:
            yield index, self.epoch


class MixedEpochSampler(EpochSampler):
    """Batches of ``labelled_per_batch`` labelled images followed by unlabelled ones, as a flat stream of keys.

    Indices follow :class:`~pand.data.unlabelled.TrainingPool`: ``0 .. n_labelled - 1`` labelled, then the unlabelled
    images. An epoch is one pass over (this rank's share of) the unlabelled images; the labelled pool, usually much
    smaller, is cycled: reshuffled each time it runs out, so within an epoch every labelled image is seen about
    equally often. Both orders are seeded by (seed, epoch), so a mid-epoch resume skips exactly what was trained on.
    """

    def __init__(self, n_labelled: int, n_unlabelled: int, batch_size: int, labelled_per_batch: int, *, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 shard_size: int | None = None) -> None:
        super().__init__(n_labelled + n_unlabelled, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                         drop_last=drop_last, shard_size=shard_size)
        self.n_labelled, self.n_unlabelled = int(n_labelled), int(n_unlabelled)
        self.batch_size = int(batch_size)
        self.labelled_per_batch = int(labelled_per_batch) if self.n_labelled else 0
        if not 0 <= self.labelled_per_batch < self.batch_size:
            raise ConfigError(f"{labelled_per_batch} labelled images in a batch of {batch_size} leave no room for "
                              "unlabelled ones")

    def _batches(self) -> tuple[int, int]:
        """(full batches, unlabelled items of a last partial batch) on this rank."""
        per_rank = self._per_rank(self.n_unlabelled, offset=self.n_labelled)
        per_batch = self.batch_size - self.labelled_per_batch
        full, left = divmod(per_rank, per_batch)
        return full, (0 if self.drop_last else left)

    def __len__(self) -> int:
        full, left = self._batches()
        return full * self.batch_size + (left + self.labelled_per_batch if left else 0)

    def _keys(self) -> list[int]:
        full, left = self._batches()
        n_batches = full + (1 if left else 0)
        per_batch = self.batch_size - self.labelled_per_batch
        # the labelled pool, usually a few shards, is cycled on every rank; local shards split the unlabelled images
        unlabelled = self._share(self.n_unlabelled, full * per_batch + left, offset=self.n_labelled)
        need = n_batches * self.labelled_per_batch
        labelled: list[int] = []
        cycle = 0
        while len(labelled) < need:
            # one pass over the labelled pool per cycle; each rank takes its share of every pass
            cycle += 1
            order = self._permutation(self.n_labelled, salt=cycle)
            labelled += order[self.rank :: self.world_size] if self.n_labelled >= self.world_size else order
        keys: list[int] = []
        for b in range(n_batches):
            keys += labelled[b * self.labelled_per_batch : (b + 1) * self.labelled_per_batch]
            keys += [self.n_labelled + j for j in unlabelled[b * per_batch : (b + 1) * per_batch]]
        return keys


class ResumableLoader(DataLoader):
    """The training loader, with its position inside the epoch saved in checkpoints.

    Lightning stores ``state_dict()`` of loaders that have one and hands it back through ``load_state_dict`` on resume;
    without it a mid-epoch resume would train the start of the epoch again and never see its end.
    ``batches_done`` reports how many batches of the current epoch the training loop has finished (the loader itself
    cannot count them: Lightning fetches one batch ahead).
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(state["epoch"], state["batches_done"] * int(self.batch_size))


class ShardSampler(Sampler):
    """Evaluation indices of one rank: ``rank, rank + world, ...``; no sample is seen twice."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))


def eval_batch_size(data: Mapping[str, Any]) -> int:
    """Images per evaluation batch: ``data.eval_batch_size``, else the training batch size."""
    return int(data.get("eval_batch_size") or data["batch_size"])


def augment_config(data: Mapping[str, Any]) -> AugmentConfig:
    aug = dict(data.get("augment") or {})
    if "blur_sigma" in aug:
        aug["blur_sigma"] = tuple(aug["blur_sigma"])
    return AugmentConfig(
        image_size=int(data["image_size"]),
        resize_size=int(data["resize_size"]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        **aug,
    )


class PandDataModule(L.LightningDataModule):
    """Datasets and loaders for one data config (``cfg.data``)."""

    def __init__(self, data: Mapping[str, Any], seed: int = 0, teacher_cache=None) -> None:
        super().__init__()
        self.cfg = dict(data)
        self.seed = int(seed)
        self.teacher_cache = teacher_cache
        self.local_shards = False  # cache.local_shards, set with the cache (pand.engine.teacher_side)
        self.augment = ReplayableAugment(augment_config(self.cfg))
        self.augment_on = str(self.cfg.get("augment_on", "cpu"))
        self.batched_augment = BatchedAugment(self.augment)
        self.eval_transform = eval_transform(
            int(self.cfg["image_size"]), int(self.cfg["resize_size"]), tuple(self.cfg["mean"]), tuple(self.cfg["std"])
        )
        self._splits: dict[str, ClassificationDataset] | None = None
        self._input_folders: dict[str, Path] = {}
        self._pool: ClassificationDataset | None = None
        self._captions: tuple[CaptionTable | None] | None = None
        #: ``{"<split>/<split>": n}`` once the splits are loaded: for every pair of splits compared by content, how
        #: many items of the first have the content of an item of the second (see :mod:`pand.data.overlap`).
        self.overlap: dict[str, int] = {}

    @property
    def splits(self) -> dict[str, ClassificationDataset]:
        if self._splits is None:
            splits = load_splits(self.cfg, overlap=self.overlap)
            self._input_folders = input_folders(splits)
            refuse_outputs_inside(self._input_folders, {"data.decoded_cache": self.cfg.get("decoded_cache")})
            if self.cfg.get("decoded_cache"):
                # Decode and resize every image once; epochs then read uint8 pixels from a memory map, no JPEG.

                size = int(self.cfg["resize_size"])
                splits = {name: with_decoded_cache(ds, Path(self.cfg["decoded_cache"]) / name, size)
                          for name, ds in splits.items()}
            self._splits = splits
        return self._splits

    def check_outputs_outside(self, outputs: Mapping[str, Any]) -> None:
        """:func:`refuse_outputs_inside` the folders of this run's images (before any decoded cache)."""
        self.splits  # noqa: B018 - loads the splits, and with them the folders
        refuse_outputs_inside(self._input_folders, outputs)

    @property
    def train_pool(self) -> ClassificationDataset:
        """What training iterates over: the labelled training images, then the unlabelled ones if the run has any
        (:class:`~pand.data.unlabelled.TrainingPool`); the teacher cache covers exactly this."""
        if self._pool is None:
            extra = self.splits.get(UNLABELLED_SPLIT)
            self._pool = self.splits["train"] if extra is None else TrainingPool(self.splits["train"], extra)
        return self._pool

    @property
    def caption_table(self) -> CaptionTable | None:
        """The captions of the training pool's images (None when it has none), indexed like :attr:`train_pool`."""
        if self._captions is None:
            self._captions = (CaptionTable.of(captions_of(self.train_pool)),)
        return self._captions[0]

    @property
    def caption_vocabulary(self) -> bool:
        """Whether the run's classes are its val captions (a captions dataset: they serve model selection only, and
        no training term may learn from them)."""
        return classless(self.cfg)

    def scored(self, split: str) -> bool:
        """Whether the ``split`` images have classes to be scored on; a captions test split has none (its images
        are scored by caption retrieval in the open-vocabulary report)."""
        ds = self.splits[split]
        return not (self.caption_vocabulary and len(ds) and not has_class_labels(ds))

    @property
    def label_free(self) -> bool:
        return label_free(self.cfg)

    def set_val_labels(self, labels: list[int]) -> None:
        """Give the label-free run's val images their labels (the teacher's predictions)."""
        val = self.splits["val"]
        if len(labels) != len(val):
            raise ValueError(f"{len(labels)} labels for {len(val)} val images")
        self.splits["val"] = TeacherLabelled(val, labels)

    def labelled_per_batch(self) -> int:
        """Labelled images in each training batch when unlabelled ones are mixed in (``data.labelled_fraction``)."""
        pool = self.train_pool
        if not isinstance(pool, TrainingPool) or pool.n_labelled == 0:
            return 0
        batch = int(self.cfg["batch_size"])
        return min(batch - 1, max(1, round(float(self.cfg.get("labelled_fraction", 0.25)) * batch)))

    @property
    def classes(self) -> list[str]:
        return list(self.splits["train"].classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - build once, before the loaders are asked for

    def teardown(self, stage: str | None = None) -> None:
        if stage == "fit" and self.teacher_cache is not None:
            rank, world = self._rank_world()
            opened = self.teacher_cache.opened_shards
            # which part of the cache this process read (with cache.local_shards: its own shards only)
            log.info("teacher cache: process %d of %d read %d of its %d shards: %s", rank, world, len(opened),
                     int(self.teacher_cache.meta["num_shards"]), ",".join(map(str, opened)) or "none")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler, drop_last: bool, loader_cls=DataLoader, *,
                batch_size: int | None = None, **extra) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        return loader_cls(
            dataset,
            batch_size=int(batch_size or self.cfg["batch_size"]),
            sampler=sampler,
            num_workers=workers,
            pin_memory=bool(self.cfg.get("pin_memory", False)) and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(init_worker, rank=self._rank_world()[0]) if workers else None,
            **extra,
        )

    def _next_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else 0

    def _train_batches_done(self) -> int:
        trainer = self.trainer
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        pool = self.train_pool
        batch = int(self.cfg["batch_size"])
        shard_size = self.teacher_cache.meta["shard_size"] if self.local_shards and self.teacher_cache else None
        if isinstance(pool, TrainingPool):
            labelled = self.labelled_per_batch()
            drop_last = bool(self.cfg.get("drop_last", True)) and pool.n_unlabelled // world >= batch - labelled
            sampler: EpochSampler = MixedEpochSampler(
                pool.n_labelled, pool.n_unlabelled, batch, labelled, seed=self.seed, rank=rank,
                world_size=world, drop_last=drop_last, shard_size=shard_size)
        else:
            drop_last = bool(self.cfg.get("drop_last", True)) and len(pool) // world >= batch
            sampler = EpochSampler(len(pool), seed=self.seed, rank=rank, world_size=world, drop_last=drop_last,
                                   shard_size=shard_size)
        # The epoch the loop runs next: Lightning creates the first iterator (where loader workers start prefetching)
        # before it sets the epoch, so a run resumed from an end-of-epoch checkpoint would replay the previous
        # epoch's order. Lightning counts an epoch as processed once its last step is done.
        sampler.set_epoch(self._next_epoch())
        views = TrainViews(pool, self.augment, self.seed, self.teacher_cache, self.augment_on, self.caption_table)
        return self._loader(views, sampler, drop_last, ResumableLoader, batches_done=self._train_batches_done)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``data.augment_on=device``: the batch's uint8 windows become its views, on the training device."""
        if isinstance(batch, dict) and WINDOW in batch:  # training batches only: eval batches carry their images
            batch = dict(batch)
            batch["image"] = self.batched_augment(batch.pop(WINDOW), batch["aug"])
        return batch

    def eval_dataloader(self, split: str, indices: list[int] | None = None) -> DataLoader:
        """Every sample of ``split`` in order (``indices``: only those samples, in that order), evaluation views."""
        if not self.scored(split):
            raise ConfigError(f"the {split} images of {self.cfg.get('name')} have captions but no class to score them "
                              "on; they are scored by the two-way caption retrieval of the open-vocabulary report "
                              "(open_vocab.json), which `pand eval` adds: evaluate with splits=[val]")
        return self._items_loader(split, indices)

    def _items_loader(self, split: str, indices: list[int] | None = None) -> DataLoader:
        rank, world = self._rank_world()
        samples = self.splits[split] if indices is None else subset(self.splits[split], indices)
        items = EvalItems(samples, self.eval_transform)
        return self._loader(items, ShardSampler(len(items), rank, world), drop_last=False,
                            batch_size=eval_batch_size(self.cfg))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.scored("test"):
            log.info("the test images of %s have captions but no class: test/acc1 is not computed; they are scored "
                     "by the caption retrieval of the open-vocabulary report", self.cfg.get("name"))
            return self._loader(EvalItems(subset(self.splits["test"], []), self.eval_transform),
                                ShardSampler(0), drop_last=False)
        return self.eval_dataloader("test")
