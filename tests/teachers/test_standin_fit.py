"""pand's stand-in teacher: fitting it (on a tiny fake Fashion-MNIST) and loading the shipped asset."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from pand.teachers import load_clip_teacher
from pand.teachers.standin_fit import ARCHITECTURE, ASSET_PATH, file_sha256, fit_teacher, main_fit, report_path
from tests.fixtures.datasets import make_fashion_mnist

REPORT_KEYS = {"architecture", "params", "epochs", "seconds", "seed", "val_top1", "test_top1"}


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    make_fashion_mnist(root, n_train=60, n_test=20)
    return root


def _json_dtypes(path):
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_one_epoch_fit_writes_loadable_fp16_weights_and_report(tmp_path, fake_fmnist):
    out = tmp_path / "a" / "teacher.safetensors"
    report = fit_teacher(out, data_root=fake_fmnist, epochs=1, batch_size=16, lr=1e-3, seed=3, progress=False)
    assert out.is_file() and report_path(out).is_file()
    on_disk = json.loads(report_path(out).read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert REPORT_KEYS <= set(report)
    assert report["architecture"] == ARCHITECTURE and report["epochs"] == 1 and report["seed"] == 3
    assert report["train_size"] + report["val_size"] == 60 and report["test_size"] == 20
    assert report["params"] > 0 and report["seconds"] >= 0
    for key in ("val_top1", "test_top1"):
        assert 0.0 <= report[key] <= 1.0
    # floats stored as float16 (integer BN counters stay integers)
    assert "F16" in _json_dtypes(out) and "F32" not in _json_dtypes(out)
    assert report["file_sha256"] == file_sha256(out)

    teacher = load_clip_teacher(ARCHITECTURE, str(out))
    assert teacher.embed_dim == report["embed_dim"]
    assert teacher.identity["weights"] == report["weights_digest"]
    emb = teacher.class_embeddings(report["classes"], [report["eval_template"]])
    assert emb.shape == (10, report["embed_dim"]) and torch.isfinite(emb).all()

    # Same seed (through the CLI entry point this time) -> byte-identical weights.
    out2 = tmp_path / "b" / "teacher.safetensors"
    argv = ["--out", str(out2), "--data-root", str(fake_fmnist), "--epochs", "1", "--seed", "3"]
    assert main_fit([*argv, "--batch-size", "16", "--lr", "1e-3", "--quiet"]) == 0
    assert file_sha256(out2) == file_sha256(out)
    assert load_clip_teacher(ARCHITECTURE, str(out2)).identity["weights"] == teacher.identity["weights"]


def test_fit_rejects_zero_epochs(tmp_path, fake_fmnist):
    with pytest.raises(ValueError, match="epochs"):
        fit_teacher(tmp_path / "t.safetensors", data_root=fake_fmnist, epochs=0, progress=False)


def test_shipped_asset_loads_with_its_report():
    assert ASSET_PATH.is_file(), "run scripts/fit_fmnist_teacher.py to produce the shipped teacher"
    report = json.loads(report_path(ASSET_PATH).read_text())
    assert REPORT_KEYS <= set(report)
    teacher = load_clip_teacher(ARCHITECTURE, str(ASSET_PATH))
    assert teacher.embed_dim == report["embed_dim"] == 96
    assert teacher.image_size == 32
    assert teacher.identity["weights"] == report["weights_digest"]
    assert isinstance(report["test_top1"], float) and 0.0 <= report["test_top1"] <= 1.0
    assert isinstance(report["val_top1"], float) and 0.0 <= report["val_top1"] <= 1.0
    img = teacher.encode_images(torch.zeros(2, 3, 32, 32))
    assert img.shape == (2, 96)


def test_teacher_config_points_at_the_shipped_asset():
    import pand.config  # noqa: F401  (registers the pand_asset resolver)

    cfg = OmegaConf.load(Path(pand.config.__file__).parent / "configs" / "teacher" / "fmnist_clip.yaml")
    assert cfg.model == ARCHITECTURE
    assert cfg.pretrained == str(ASSET_PATH)
