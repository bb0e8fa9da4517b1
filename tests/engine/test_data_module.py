import torch

from pand.engine.data import EpochSampler, PandDataModule, ShardSampler


def _data_cfg(root, **extra):
    cfg = {
        "name": "cub", "root": str(root), "num_classes": 3, "download": False, "val_fraction": 0.2, "split_seed": 0,
        "samples_per_class": None, "class_names_file": None, "batch_size": 4, "num_workers": 0,
        "image_size": 32, "resize_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "augment": {"degrees": 30.0, "blur": True, "blur_sigma": [0.1, 2.0]},
    }
    cfg.update(extra)
    return cfg


def test_epoch_sampler_shards_are_disjoint_and_cover_the_data():
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=2, drop_last=False)) for r in range(2)]
    indices = [i for s in shards for i, _ in s]
    assert sorted(set(indices)) == list(range(10)) and len(indices) == 10
    s = EpochSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _ in first] != [i for i, _ in second]
    assert {e for _, e in second} == {1}


def test_shard_sampler_has_no_duplicates():
    parts = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))


def test_training_views_are_replayable_from_index_and_epoch(cub_root):
    dm = PandDataModule(_data_cfg(cub_root), seed=5)
    dm.setup()
    views = dm.train_dataloader().dataset
    a, b, c = views[(2, 0)], views[(2, 0)], views[(2, 1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["aug"], b["aug"])
    assert not torch.equal(a["aug"], c["aug"])
    # The stored parameters rebuild the same view: what the teacher cache relies on.
    rebuilt = dm.augment.apply(views.dataset.load_image(2), a["aug"])
    assert torch.equal(rebuilt, a["image"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "labelled", "aug"} and batch["labelled"].all()
    assert batch["image"].shape == (4, 3, 32, 32)


def test_few_shot_pool_carves_val_from_the_labelled_images(cub_root):
    dm = PandDataModule(_data_cfg(cub_root, samples_per_class=5, val_fraction=0.2), seed=0)
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) + len(val) == 15
    assert sorted(set(val.targets)) == [0, 1, 2] and val.split == "val"
    ids_train = {train.sample_id(i) for i in range(len(train))}
    ids_val = {val.sample_id(i) for i in range(len(val))}
    assert not ids_train & ids_val


def test_a_resumed_epoch_is_replayed_even_when_iteration_starts_before_the_epoch_is_set():
    # Loader workers prefetch as soon as Lightning creates the iterator, before it calls set_epoch on a resume:
    # the sampler must already iterate the resumed epoch, minus what was trained on.
    straight = EpochSampler(12, seed=5)
    straight.set_epoch(2)
    whole_epoch = list(straight)
    resumed = EpochSampler(12, seed=5)
    resumed.resume_at(2, 4)
    assert list(resumed) == whole_epoch[4:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == 12  # the skip applies to the resumed epoch only


def test_evaluation_batches_take_eval_batch_size_and_training_keeps_batch_size(cub_root):
    dm = PandDataModule(_data_cfg(cub_root, eval_batch_size=5), seed=0)
    dm.setup()
    assert dm.train_dataloader().batch_size == 4
    assert dm.val_dataloader().batch_size == 5 and dm.test_dataloader().batch_size == 5
    assert [len(b["label"]) for b in dm.test_dataloader()] == [5, 1]  # 6 test images, none dropped
    dm = PandDataModule(_data_cfg(cub_root), seed=0)  # not set (or null): the training batch size
    assert dm.test_dataloader().batch_size == 4
