"""t-SNE of student features from tiny checkpoints: every test image is embedded, and the figures are written."""

import numpy as np
import pytest
from PIL import Image

from pand.analysis import tsne
from pand.analysis.tsne import main_tsne, student_features, tsne_compare
from pand.cli import main
from pand.engine.data import PandDataModule
from pand.errors import CheckpointError, ConfigError, MismatchError
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """Two one-epoch students on the tiny CUB fixture (plain CE, two seeds: no teacher needed), and the data root."""
    tmp = tmp_path_factory.mktemp("tsne")
    root = make_cub(tmp / "data", n_classes=3, per_class=6, test_per_class=2)
    ckpts = []
    for seed in (0, 1):
        run = tmp / f"ce-{seed}"
        extra = ("trainer.max_epochs=1", "test=false", "method=ce", f"seed={seed}")
        assert main(["train", *tiny_overrides(root, run, *extra)]) == 0
        ckpts.append(run / "checkpoints" / "best.ckpt")
    return ckpts, root


def test_student_features_cover_the_whole_split(tiny_ckpts):
    import torch

    (ckpt, _), root = tiny_ckpts
    config = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    dm = PandDataModule(config["data"], seed=config["seed"])
    feats, labels, classes = student_features(ckpt, "test", batch_size=4)  # 6 test images: a partial last batch
    assert feats.ndim == 2 and feats.shape[0] == len(dm.splits["test"]) == 6
    assert labels.shape == (6,) and sorted(set(labels.tolist())) == [0, 1, 2]
    assert classes == dm.classes and np.isfinite(feats).all()
    again, _, _ = student_features(ckpt, "test", data_overrides={"root": str(root), "batch_size": 6})
    np.testing.assert_allclose(feats, again, rtol=1e-4, atol=1e-5)  # eval mode: deterministic, batch-independent


def test_tsne_compare_writes_the_combined_and_single_figures(tiny_ckpts, tmp_path):
    ckpts, _ = tiny_ckpts
    written = tsne_compare(ckpts, ["w/o KD", "VL2Lite"], tmp_path / "figs", perplexity=30)
    names = [p.name for p in written]
    assert names == ["tsne_compare.png", "tsne_0_w-o-kd.png", "tsne_1_vl2lite.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as im:
            im.verify()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(names)  # no temporary files left
    with Image.open(written[0]) as combined, Image.open(written[1]) as single:
        assert combined.size[0] > single.size[0]  # panels side by side


def test_tsne_cli(tiny_ckpts, tmp_path, capsys):
    ckpts, root = tiny_ckpts
    out = tmp_path / "cli"
    args = [str(ckpts[0]), "--labels", "A", "--out", str(out), f"data.root={root}", "data.num_workers=0"]
    assert main_tsne(args) == 0
    assert {p.name for p in out.iterdir()} == {"tsne_compare.png", "tsne_0_a.png"}
    assert "tsne_compare.png" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="only data.\\* overrides are accepted, got optim.lr=1 \\(pand tsne --help\\)"):
        main_tsne([str(ckpts[0]), "--out", str(out), "optim.lr=1"])


def test_tsne_compare_refuses_a_label_count_mismatch(tiny_ckpts, tmp_path):
    ckpts, _ = tiny_ckpts
    with pytest.raises(ConfigError, match="2 checkpoint.*3 label"):
        tsne_compare(ckpts, ["a", "b", "c"], tmp_path)
    assert not any(tmp_path.iterdir())


def test_tsne_compare_refuses_checkpoints_of_different_data(tmp_path, monkeypatch):
    sizes = iter([6, 9])

    def fake_features(path, split, data_overrides, batch_size, device, max_samples, seed):
        n = next(sizes)
        kept = min(n, max_samples or n)  # the subsets are of the same size; the splits are not
        return np.random.default_rng(0).normal(size=(kept, 8)), np.arange(kept) % 3, ["a", "b", "c"], n

    monkeypatch.setattr(tsne, "_features", fake_features)
    with pytest.raises(MismatchError, match="differ in size"):
        tsne_compare(["x.ckpt", "y.ckpt"], ["x", "y"], tmp_path, max_samples=5)


def test_a_subset_reads_only_its_images_and_matches_the_whole_splits_rows(tiny_ckpts, monkeypatch):
    (ckpt, _), _ = tiny_ckpts
    whole, whole_labels, _ = student_features(ckpt, "test", batch_size=4)
    keep = tsne.sample_indices(len(whole), 4, seed=3)
    assert keep == sorted(keep) and len(set(keep)) == 4 and tsne.sample_indices(6, 6, 0) is None
    read = []
    original = PandDataModule.eval_dataloader
    monkeypatch.setattr(PandDataModule, "eval_dataloader",
                        lambda self, split, indices=None: read.append(indices) or original(self, split, indices))
    part, part_labels, _ = student_features(ckpt, "test", batch_size=4, max_samples=4, seed=3)
    assert read == [keep]
    np.testing.assert_allclose(part, whole[keep], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(part_labels, whole_labels[keep])


def test_an_embedding_saved_and_loaded_draws_the_same_figures(tiny_ckpts, tmp_path):
    ckpts, _ = tiny_ckpts
    embeddings = [tsne.embed_checkpoint(c, label, max_samples=5, seed=1) for c, label in zip(ckpts, ("a", "b"))]
    assert embeddings[0].points.shape == (5, 2) and embeddings[0].split == "test"
    paths = [e.save(tmp_path / f"{e.label}.npz") for e in embeddings]
    loaded = [tsne.Embedding.load(p) for p in paths]
    for e, back in zip(embeddings, loaded):
        np.testing.assert_array_equal(back.points, e.points.astype(np.float32))
        np.testing.assert_array_equal(back.labels, e.labels)
        assert (back.label, back.classes, back.split) == (e.label, e.classes, e.split)
    written = tsne.plot_embeddings(loaded, tmp_path / "figs")
    assert [p.name for p in written] == ["tsne_compare.png", "tsne_0_a.png", "tsne_1_b.png"]
    with pytest.raises(MismatchError, match="different numbers of images"):
        tsne.plot_embeddings([loaded[0], tsne.Embedding("c", loaded[1].points[:3], loaded[1].labels[:3],
                                                        loaded[1].classes, "test")], tmp_path / "no")


def test_embed_clamps_the_perplexity():
    points = tsne.embed(np.random.default_rng(0).normal(size=(5, 4)), perplexity=30)
    assert points.shape == (5, 2)
    with pytest.raises(ConfigError):
        tsne.embed(np.zeros((1, 4)))


def test_student_features_rejects_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        student_features(tmp_path / "nope.ckpt")
