"""How a run's splits are put together from a data config (pand.data.assembly); the unlabelled and label-free cases
are in test_unlabelled.py, the overlap checks in test_overlap.py."""

from pand.data.assembly import label_free, load_splits, per_class_subset


def test_per_class_subset_is_seeded_and_balanced():
    targets = [0] * 10 + [1] * 3
    a = per_class_subset(targets, 4, seed=1)
    assert a == per_class_subset(targets, 4, seed=1)
    assert sum(targets[i] == 0 for i in a) == 4 and sum(targets[i] == 1 for i in a) == 3


def test_label_free_means_samples_per_class_zero_and_nothing_else():
    assert label_free({"samples_per_class": 0})
    assert not label_free({"samples_per_class": None}) and not label_free({})
    assert not label_free({"samples_per_class": 3})


def test_few_shot_pool_carves_val_from_the_pool(cub_root):
    data = {"name": "cub", "root": str(cub_root), "num_classes": 3, "val_fraction": 0.25, "split_seed": 0,
            "verify_images": False, "samples_per_class": 4}
    splits = load_splits(data)
    assert len(splits["train"]) + len(splits["val"]) == 12 and splits["val"].split == "val"
    assert sorted(set(splits["val"].targets)) == [0, 1, 2]
    again = load_splits(data)
    assert [again["train"].sample_id(i) for i in range(len(again["train"]))] == \
        [splits["train"].sample_id(i) for i in range(len(splits["train"]))]
