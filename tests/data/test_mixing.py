"""Mixup / CutMix of training batches: reproducible per step, targets mixed like the images, refused with a cache."""

import pytest
import torch
import torch.nn.functional as F

from pand.cli import main
from pand.data.mixing import BatchMixer, mixing_enabled
from pand.distillers import Distiller
from tests.fixtures.datasets import make_cifar100

C = 5


def _batch(n=6, size=16):
    torch.manual_seed(0)
    return {"image": torch.randn(n, 3, size, size), "label": torch.arange(n) % C, "index": torch.arange(n)}


def test_mixup_blends_images_and_targets_with_the_same_lam():
    batch = _batch()
    out = BatchMixer(C, mixup_alpha=0.8, seed=3)(batch, step=7)
    x, xf = batch["image"], batch["image"].flip(0)
    # lam is whatever the step drew; recover it from one pixel and check every pixel and target agree with it.
    diff = x - xf
    lam = ((out["image"] - xf)[diff.abs() > 1e-3] / diff[diff.abs() > 1e-3]).mean()
    torch.testing.assert_close(out["image"], lam * x + (1 - lam) * xf, atol=1e-5, rtol=0)
    onehot = F.one_hot(batch["label"], C).float()
    torch.testing.assert_close(out["soft_label"], lam * onehot + (1 - lam) * onehot.flip(0), atol=1e-5, rtol=0)
    dominant = batch["label"] if lam >= 0.5 else batch["label"].flip(0)
    assert torch.equal(out["label"], dominant)
    assert torch.equal(out["index"], batch["index"])


def test_cutmix_target_share_is_the_pasted_area():
    batch = _batch(size=32)
    out = BatchMixer(C, cutmix_alpha=1.0, seed=1)(batch, step=2)
    pasted = (out["image"] != batch["image"]).any(dim=1)[1]  # pixels taken from the partner (sample 1 <- sample 4)
    area = pasted.float().mean().item()
    assert 0 < area < 1
    share = out["soft_label"][1, batch["label"][1]].item()
    assert share == pytest.approx(1 - area, abs=1e-6)
    assert torch.allclose(out["soft_label"].sum(1), torch.ones(6))


def test_the_same_step_mixes_the_same_way_and_other_steps_differ():
    mixer = BatchMixer(C, mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)
    a, b = mixer(_batch(), step=11), mixer(_batch(), step=11)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["soft_label"], b["soft_label"])
    others = [mixer(_batch(), step=s)["soft_label"] for s in range(12, 20)]
    assert any(not torch.equal(o, a["soft_label"]) for o in others)


def test_label_smoothing_and_prob_zero():
    out = BatchMixer(C, mixup_alpha=1.0, label_smoothing=0.1, seed=0)(_batch(), step=0)
    assert torch.allclose(out["soft_label"].sum(1), torch.ones(6)) and out["soft_label"].min() >= 0.1 / C - 1e-7
    assert not mixing_enabled({"mixup_alpha": 1.0, "prob": 0.0})
    assert BatchMixer.from_config({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, C, seed=0) is None


def test_cross_entropy_uses_the_soft_labels_of_a_mixed_batch():
    logits = torch.randn(6, C)
    mixed = BatchMixer(C, mixup_alpha=0.8, seed=5)(_batch(), step=1)
    expected = -(mixed["soft_label"] * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(Distiller.cross_entropy(logits, mixed), expected)
    plain = _batch()
    torch.testing.assert_close(Distiller.cross_entropy(logits, plain), F.cross_entropy(logits, plain["label"]))


def _args(root, run, *extra):
    return ["train", "data=cifar100", f"data.root={root}", "data.num_classes=5", "data.batch_size=4",
            "data.num_workers=0", "data.val_fraction=0.25", "student=cifar", "student.name=resnet8",
            "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "test=false",
            f"run_dir={run}", *extra]


def test_a_run_with_mixup_and_cutmix_trains_and_a_cache_is_refused(tmp_path, capsys):
    root = make_cifar100(tmp_path / "data", n_classes=5, per_class=8, test_per_class=2)
    mix = ["mixing.mixup_alpha=0.8", "mixing.cutmix_alpha=1.0", "mixing.label_smoothing=0.1"]
    assert main(_args(root, tmp_path / "ce", "method=ce", *mix)) == 0
    teacher = ["teacher=classifier", "teacher.model=resnet8", "teacher.pretrained=random"]
    assert main(_args(root, tmp_path / "kd", "method=kd", *teacher, *mix)) == 0
    capsys.readouterr()
    assert main(_args(root, tmp_path / "kd2", "method=kd", *teacher, *mix, f"cache.dir={tmp_path / 'cache'}",
                      "cache.views=2")) == 2
    assert "unmixed views" in capsys.readouterr().err
