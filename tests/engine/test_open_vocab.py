"""Open-vocabulary runs end to end: base-to-novel training (live and cached teacher), the report, retrieval metrics,
``pand eval`` of the student, and classification with class names given at run time."""

import json

import pytest
import torch

from pand.cli import main
from pand.config import compose, to_plain
from pand.data import base_novel_classes, restrict_classes
from pand.data.assembly import NOVEL_TEST, load_splits
from pand.engine.config_checks import validate_train_config
from pand.engine.open_vocab_eval import (
    clip_benchmark_records,
    harmonic_mean,
    retrieval_metrics,
    top1,
    vocabulary_for,
    zero_shot_metrics,
)
from pand.errors import ConfigError
from pand.students.checkpoint import load_checkpoint_student
from pand.teachers.registry import load_teacher
from pand.teachers.source import LiveTeacherSource
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub


@pytest.fixture
def cub4(tmp_path):
    return make_cub(tmp_path / "data", n_classes=4, per_class=5, test_per_class=3)


def _overrides(root, run, *extra):
    return tiny_overrides(root, run, "method=openvocab", "data.num_classes=4", "data.class_split=base_novel", *extra)


# -- metrics and splits --------------------------------------------------------------------------------------------
def test_retrieval_metrics_hand_computed():
    # 4 images (labels 0, 1, 0, 1); query 0 ranks them 2, 1, 0, 3 -> relevant at ranks 1 and 3; query 1 ranks
    # 0, 2, 3, 1 -> relevant at ranks 3 and 4.
    sim = torch.tensor([[0.5, 0.9], [0.8, 0.1], [0.9, 0.5], [0.1, 0.2]])
    labels = torch.tensor([0, 1, 0, 1])
    m = retrieval_metrics(sim, labels, ks=(1, 2, 3))
    assert m["R@1"] == pytest.approx(0.5) and m["R@2"] == pytest.approx(0.5) and m["R@3"] == pytest.approx(1.0)
    ap0 = (1 / 1 + 2 / 3) / 2
    ap1 = (1 / 3 + 2 / 4) / 2
    assert m["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert retrieval_metrics(sim, labels, queries=[1], ks=(1,))["mAP"] == pytest.approx(ap1)
    assert top1(sim, labels) == pytest.approx(0.5)
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2) and harmonic_mean(0, 0) == 0


def test_zero_shot_metrics_hand_computed():
    # 7 classes so that top-5 leaves two out. Rows: the scores of 5 images; labels 0, 0, 0, 1, 6.
    sim = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1 -> top-1 and top-5 hit
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 0: rank 7 -> miss, miss
        [0.5, 0.9, 0.8, 0.7, 0.6, 0.0, 0.0],  # label 0: rank 5 -> top-5 hit only
        [0.2, 0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 1: rank 7 -> miss, miss
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.9],  # label 6: rank 1 -> hit, hit
    ])
    labels = torch.tensor([0, 0, 0, 1, 6])
    m = zero_shot_metrics(sim, labels)
    assert m["acc1"] == pytest.approx(2 / 5)
    assert m["acc5"] == pytest.approx(3 / 5)
    # per-class top-1 recall: class 0 1/3, class 1 0/1, class 6 1/1 (absent classes do not count)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    # fewer than 5 classes: top-5 is every class, always a hit
    assert zero_shot_metrics(sim[:, :2], torch.tensor([0, 1, 1, 0, 1]))["acc5"] == 1.0


def test_clip_benchmark_records_have_its_fields():
    report = {"class_split": {}, "student": {"zeroshot": {"base": {"acc1": 0.5}, "novel": {"acc1": 0.25}}},
              "teacher": {"zeroshot": {"base": {"acc1": 0.9}, "novel": {"acc1": 0.8}}}}
    records = clip_benchmark_records(report, "cub", {"student": ("s", "best.ckpt"), "teacher": ("t", "openai")})
    assert [(r["dataset"], r["model"], r["pretrained"], r["metrics"]["acc1"]) for r in records] == [
        ("cub/base", "s", "best.ckpt", 0.5), ("cub/novel", "s", "best.ckpt", 0.25), ("cub/base", "t", "openai", 0.9),
        ("cub/novel", "t", "openai", 0.8)]
    assert all(set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"} for r in records)
    assert {r["task"] for r in records} == {"zeroshot_classification"}


def test_base_novel_split_is_a_seeded_half_and_novel_images_stay_out_of_training(cub4):
    base, novel = base_novel_classes(4, seed=0)
    assert len(base) == 2 and sorted(base + novel) == [0, 1, 2, 3]
    assert base_novel_classes(4, seed=0) == (base, novel) and base_novel_classes(5, 0)[0].__len__() == 3
    cfg = to_plain(compose("train", _overrides(cub4, "unused")))["data"]
    splits = load_splits(cfg)
    full = load_splits({**cfg, "class_split": None})
    names = full["train"].classes
    assert splits["train"].classes == [names[c] for c in base] == splits["val"].classes == splits["test"].classes
    assert splits[NOVEL_TEST].classes == [names[c] for c in novel]
    train_ids = {splits["train"].sample_id(i) for i in range(len(splits["train"]))}
    novel_train_ids = {full["train"].sample_id(i) for i, y in enumerate(full["train"].targets) if y in novel}
    assert train_ids and not train_ids & novel_train_ids
    assert len(splits[NOVEL_TEST]) == sum(y in novel for y in full["test"].targets)
    sub = restrict_classes(full["test"], [3, 1])
    assert sub.classes == [names[3], names[1]] and set(sub.targets) == {0, 1}


def test_class_split_is_refused_for_closed_set_methods(cub4, tmp_path):
    cfg = to_plain(compose("train", tiny_overrides(cub4, tmp_path / "r", "data.class_split=base_novel")))
    with pytest.raises(ConfigError, match="open-vocabulary student"):
        validate_train_config(cfg)


# -- end to end ----------------------------------------------------------------------------------------------------
def test_base_to_novel_run_reports_student_and_teacher_and_eval_reproduces_it(cub4, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_overrides(cub4, run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "open_vocab.json").read_text())
    assert summary["open_vocab"]["student"] == report["student"]
    for who in ("student", "teacher"):
        r = report[who]
        assert r["hm"] == pytest.approx(harmonic_mean(r["base"], r["novel"]))
        assert set(r["retrieval"]) == {"R@1", "R@5", "R@10", "mAP"} and 0 <= r["retrieval"]["mAP"] <= 1
        assert "retrieval_novel" in r
    assert len(report["class_split"]["base"]) == 2 and len(report["class_split"]["novel"]) == 2
    for who in ("student", "teacher"):
        zs = report[who]["zeroshot"]
        assert set(zs) == {"base", "novel", "all"} and zs["base"]["acc1"] == pytest.approx(report[who]["base"])
        assert zs["all"]["acc1"] == pytest.approx(report[who]["all"]) and zs["novel"]["acc5"] == 1.0  # 2 classes
    assert len(report["clip_benchmark"]) == 6 and report["clip_benchmark"][0]["dataset"] == "cub/base"
    assert "never seen" in report["class_split"]["note"]
    # Lightning's test split is the base test images among the base classes: the report's "base".
    assert summary["test_acc1"] == pytest.approx(report["student"]["base"])

    # pand eval rebuilds the open-vocabulary student from its checkpoint (the teacher only for the report).
    capsys.readouterr()
    best = run / "checkpoints" / "best.ckpt"
    assert main(["eval", f"ckpt_path={best}", "data.num_workers=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc1"] == pytest.approx(summary["test_acc1"])


def test_cached_run_with_cross_attention_never_runs_the_teacher_image_tower_in_training(cub4, tmp_path, monkeypatch):
    def refuse(self, batch, keys):
        raise AssertionError("the live teacher ran during a cached run")

    from pand.engine.data import PandDataModule
    from pand.engine.teacher_side import open_or_build_cache

    run = tmp_path / "run"
    cache = (f"cache.dir={tmp_path / 'cache'}", "cache.views=2")
    cfg = to_plain(compose("train", _overrides(cub4, run, *cache)))
    open_or_build_cache(cfg, PandDataModule(cfg["data"], seed=0))  # building the cache runs the teacher: first
    monkeypatch.setattr(LiveTeacherSource, "forward", refuse)
    assert main(["train", *_overrides(cub4, run, *cache, "method.fusion=cross_attention", "method.distill=l2")]) == 0
    report = json.loads((run / "open_vocab.json").read_text())
    assert 0 <= report["student"]["hm"] <= 1
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert "distiller.student.vocabulary_tokens" in state  # cross-attention keeps its prompt tokens with the weights


def test_student_classifies_names_given_at_run_time(cub4, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *_overrides(cub4, run, "trainer.max_epochs=1")]) == 0
    student, config, _ = load_checkpoint_student(run / "checkpoints" / "best.ckpt")
    teacher = load_teacher(config, device="cpu")
    from pand.engine.data import PandDataModule

    data = PandDataModule(config["data"], seed=0)
    names = data.splits["test"].classes + data.splits[NOVEL_TEST].classes  # includes classes never trained on
    images = torch.stack([data.eval_transform(data.splits[NOVEL_TEST].load_image(i)) for i in range(3)])
    student.set_vocabulary(*vocabulary_for(teacher, names, config["data"]["templates"], student))
    with torch.no_grad():
        logits = student(images)
    assert logits.shape == (3, 4)
    # Reordering the names reorders the scores; a subset keeps its columns.
    order = [2, 0, 3, 1]
    student.set_vocabulary(*vocabulary_for(teacher, [names[i] for i in order], config["data"]["templates"], student))
    with torch.no_grad():
        torch.testing.assert_close(student(images), logits[:, order], rtol=1e-4, atol=1e-4)
    student.set_vocabulary(*vocabulary_for(teacher, names[2:], config["data"]["templates"], student))
    with torch.no_grad():
        torch.testing.assert_close(student(images), logits[:, 2:], rtol=1e-4, atol=1e-4)
