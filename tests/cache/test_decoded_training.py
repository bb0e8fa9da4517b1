import json

from pand.cache.images import CachedImageDataset
from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.data import PandDataModule
from tests.engine.conftest import tiny_overrides


def test_training_reads_the_decoded_cache_and_gives_the_same_views(cub_root, tmp_path):
    plain = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "a")))
    decoded = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "b", f"data.decoded_cache={tmp_path / 'dec'}")))
    a, b = PandDataModule(plain["data"]), PandDataModule(decoded["data"])
    assert all(isinstance(ds, CachedImageDataset) for ds in b.splits.values())
    assert (tmp_path / "dec" / "train" / "meta.json").is_file()
    va, vb = a.train_dataloader().dataset, b.train_dataloader().dataset
    for key in [(0, 0), (3, 1)]:
        assert (va[key]["image"] == vb[key]["image"]).all()
    assert (a.eval_dataloader("test").dataset[1]["image"] == b.eval_dataloader("test").dataset[1]["image"]).all()
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", f"data.decoded_cache={tmp_path / 'dec'}",
                                          "trainer.max_epochs=1")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_acc1"] is not None
