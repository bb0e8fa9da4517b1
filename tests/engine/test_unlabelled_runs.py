"""Runs with unlabelled training images, end to end: mixed batches reach the distiller with their mask, the teacher
cache covers the unlabelled images, a label-free run trains with val labelled by its teacher, resume stays exact,
and settings that do not go with unlabelled images are refused before anything loads."""

import json

import numpy as np
import pytest
import torch

from pand.cache.teacher.layout import finished_rows
from pand.cli import main
from pand.config import compose, to_plain
from pand.distillers.kd import KD
from pand.engine.config_checks import validate_train_config
from pand.engine.run import build_training
from pand.errors import ConfigError
from tests.engine.conftest import tiny_overrides

REST = ("method=kd", "data.samples_per_class=2", "data.unlabelled=rest")


def _config(cub_root, run, *extra):
    return to_plain(compose("train", tiny_overrides(cub_root, run, *extra)))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_batches_carry_the_mask_and_the_distiller_sees_both_kinds(cub_root, tmp_path, monkeypatch):
    seen = []
    original = KD.training_losses

    def spy(self, batch, teacher, progress):
        seen.append((batch["labelled"].clone(), batch["label"].clone(), batch["index"].clone()))
        return original(self, batch, teacher, progress)

    monkeypatch.setattr(KD, "training_losses", spy)
    run = tmp_path / "run"
    # 6 labelled images (3 train + 3 val), 12 unlabelled; batches of 4 = 1 labelled + 3 unlabelled
    assert main(["train", *tiny_overrides(cub_root, run, *REST)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labelled_images"] == 3 and summary["unlabelled_images"] == 12
    assert len(seen) == 2 * 12 // 3  # an epoch is one pass over the unlabelled images
    for mask, label, index in seen:
        assert mask.tolist() == [True, False, False, False]
        assert (label[~mask] == -1).all() and (label[mask] >= 0).all()
        assert (index[mask] < 3).all() and (index[~mask] >= 3).all()
    epoch0 = torch.cat([index[~mask] for mask, _, index in seen[:4]])
    assert sorted(epoch0.tolist()) == list(range(3, 15))


def test_the_teacher_cache_covers_the_unlabelled_images(cub_root, tmp_path, monkeypatch):
    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = tiny_overrides(cub_root, run, *REST, f"cache.dir={cache}", "cache.views=2")
    assert main(["cache", "build", *overrides]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == 3 + 12 and finished_rows(cache) == 3 + 12 and meta["complete"]

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache covers the run")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    assert main(["train", *overrides]) == 0
    monkeypatch.undo()
    config = _config(cub_root, tmp_path / "again", *REST, f"cache.dir={cache}", "cache.views=2")
    data, module = build_training(config)
    batch = next(iter(data.train_dataloader()))
    unlabelled = ~batch["labelled"]
    assert unlabelled.any() and (batch["index"][unlabelled] >= 3).all()
    cached = module.teacher_source(batch, {"image_embeds"})["image_embeds"]
    from pand.teachers import LiveTeacherSource
    from pand.teachers.registry import load_teacher

    live = LiveTeacherSource(load_teacher(config, device="cpu"), config["data"]["mean"], config["data"]["std"])
    fresh = live(batch, {"image_embeds"})["image_embeds"]  # the same replayed views, through the teacher now
    torch.testing.assert_close(cached[unlabelled].float(), fresh[unlabelled].float(), atol=2e-3, rtol=0)


def test_a_label_free_run_trains_from_the_teacher_alone_and_selects_on_agreement_with_it(cub_root, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=kd", "data.samples_per_class=0")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labelled_images"] == 0 and summary["val_labels"] == "teacher"
    assert summary["unlabelled_images"] == 18 - round(0.2 * 18)
    assert 0 <= summary["test_acc1"] <= 1 and 0 <= summary["val_acc1"] <= 1
    out = tmp_path / "eval.json"
    assert main(["eval", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"out={out}"]) == 0
    evaluated = json.loads(out.read_text())
    assert "val_acc1" not in evaluated and "label-free" in evaluated["val_skipped"]
    assert evaluated["test_acc1"] == pytest.approx(summary["test_acc1"])

    from pand.engine.teacher_side import live_source

    data, module = build_training(_config(cub_root, tmp_path / "again", "method=kd", "data.samples_per_class=0"))
    teacher = live_source(module.teacher_source).teacher
    val = data.splits["val"]
    assert min(val.targets) >= 0  # labelled by the teacher before training
    images = torch.stack([data.eval_transform(val.load_image(i)) for i in range(len(val))])
    logits = module.teacher_source({"image": images}, {"logits"})["logits"]
    assert val.targets == logits.argmax(-1).tolist()
    assert teacher is not None


def test_resume_with_unlabelled_images_is_exact(cub_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_overrides(cub_root, straight, *REST, "test=false")]) == 0
    assert main(["train", *tiny_overrides(cub_root, resumed, *REST, "trainer.max_epochs=1", "test=false")]) == 0
    last = resumed / "checkpoints" / "last.ckpt"
    assert main(["train", *tiny_overrides(cub_root, resumed, *REST, "test=false"), f"ckpt_path={last}"]) == 0
    a, b = (_load(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (straight, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("extra", "message"), [
    (("method=ce", "data.samples_per_class=2", "data.unlabelled=rest"), "learns from labels alone"),
    (("method=ce", "data.samples_per_class=0"), "learns from labels alone"),
    ((*REST, "mixing.mixup_alpha=0.2"), "Mixup"),
    (("method=kd", "data.unlabelled=rest"), "samples_per_class"),
    (("method=kd", "data.samples_per_class=-1"), "samples_per_class"),
    ((*REST, "data.labelled_fraction=1.0"), "labelled_fraction"),
])
def test_settings_that_do_not_go_with_unlabelled_images_are_refused(cub_root, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(_config(cub_root, tmp_path / "run", *extra))


def test_the_datasets_own_images_as_unlabelled_images_stop_the_run_before_training(cub_root, tmp_path, capsys):
    images = cub_root / "images"
    unlabelled = ("method=kd", "data.samples_per_class=2", f"data.unlabelled={images}")
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", *unlabelled)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("pand train: error: ")
    assert "unlabelled images are also test images (the same bytes): " in err[0] and str(images) in err[0]
    assert "data.allow_overlap=true" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    # allowed: the run trains, and its summary records the overlap it was allowed
    again = tmp_path / "again"
    assert main(["train", *tiny_overrides(cub_root, again, *unlabelled, "data.allow_overlap=true", "test=false",
                                          "trainer.max_epochs=1")]) == 0
    summary = json.loads((again / "summary.json").read_text())
    assert summary["overlap"] == {"allowed": True, "images": {"unlabelled/test": 6, "unlabelled/val": 3}}
    with pytest.raises(ConfigError, match="data.allow_overlap='yes' is not allowed: expected true or false"):
        validate_train_config(_config(cub_root, tmp_path / "run", *REST, "data.allow_overlap=yes"))


def test_a_folder_pand_wrote_is_refused_as_unlabelled_images_before_anything_loads(cub_root, tmp_path):
    from pand.io import mark_output_folder

    old_run = tmp_path / "old-run"
    old_run.mkdir()
    mark_output_folder(old_run, "run")
    with pytest.raises(ConfigError, match=f"data.unlabelled={old_run} is a folder pand wrote \\(run output"):
        validate_train_config(_config(cub_root, tmp_path / "run", "method=kd", "data.samples_per_class=2",
                                      f"data.unlabelled={old_run}"))
