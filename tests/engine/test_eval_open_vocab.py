"""``pand eval`` of an open-vocabulary checkpoint: the run's open-vocabulary report again, from the checkpoint and the
run's teacher, and its figures as clip_benchmark's result files (the fields, metric names and file names that
``clip_benchmark eval`` writes, so that ``clip_benchmark build`` aggregates both); a closed-set checkpoint's
evaluation stays as it was, without a teacher."""

import json
import os

import pytest

from pand.cli import main
from pand.engine.open_vocab_eval import (
    CLIP_BENCHMARK_KEYS,
    clip_benchmark_file_name,
    clip_benchmark_records,
    write_clip_benchmark,
)
from pand.engine.run import evaluate
from pand.errors import ConfigError, OutputError
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub

# What clip_benchmark writes (clip_benchmark/cli.py, `run`: the `dump` dict; metrics/zeroshot_classification.py and
# metrics/zeroshot_retrieval.py), written out here rather than read from pand so that a change of pand's side shows.
FIELDS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
CLASSIFICATION_METRICS = {"acc1", "acc5", "mean_per_class_recall"}
# the closed-set results of `pand eval` before open-vocabulary students got their report
CLOSED_SET_KEYS = {"checkpoint", "val_acc1", "val_acc5", "val_size", "test_acc1", "test_acc5", "test_size"}


def clip_benchmark_name(record):
    """clip_benchmark's default --output, "{dataset}_{pretrained}_{model}_{language}_{task}.json", filled as its
    `run` fills it: dataset slashes to underscores, a pretrained file by its base name (and, unlike there, no slash
    left in the other parts, where it would make folders)."""
    pretrained = record["pretrained"]
    if os.path.isfile(pretrained):
        pretrained = os.path.basename(pretrained)
    parts = (record["dataset"], pretrained, record["model"], record["language"], record["task"])
    return "_".join(p.replace("/", "_") for p in parts) + ".json"


def clip_benchmark_build(folder):
    """The rows of clip_benchmark's `build` command (main_build.process_file) for a folder of result files."""
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            data = json.loads((folder / name).read_text())
            row = dict(data["metrics"])
            row.update(data)
            del row["metrics"]
            row["model_fullname"] = row["model"] + " " + row["pretrained"]
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base-to-novel openvocab run on 10 classes (5 base, 5 novel: acc5 is defined in every part)."""
    tmp = tmp_path_factory.mktemp("ov")
    root = make_cub(tmp / "data", n_classes=10, per_class=4, test_per_class=2)
    run = tmp / "run"
    assert main(["train", *tiny_overrides(root, run, "method=openvocab", "data.num_classes=10",
                                          "data.class_split=base_novel", "trainer.max_epochs=1")]) == 0
    return root, run


def _same_numbers(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same_numbers(a[k], b[k])
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6)
    else:
        assert a == b


# -- the records ---------------------------------------------------------------------------------------------------
def test_records_carry_clip_benchmark_fields_and_a_caption_retrieval_record(tmp_path):
    report = {
        "classes": list("abcdefgh"), "class_split": {"base": list("abcde"), "novel": list("fgh")},
        "student": {"zeroshot": {"base": {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5},
                                 "novel": {"acc1": 0.25, "acc5": 1.0, "mean_per_class_recall": 0.2},
                                 "all": {"acc1": 0.4, "acc5": 0.9, "mean_per_class_recall": 0.3}},
                    "retrieval": {"R@1": 0.5, "mAP": 0.4},
                    "captions": {"image_retrieval_recall@1": 0.3, "text_retrieval_recall@1": 0.4,
                                 "image_retrieval_recall@5": 0.7, "text_retrieval_recall@5": 0.8, "captions": 12}},
        "teacher": {"zeroshot": {"base": {"acc1": 0.9, "acc5": 1.0, "mean_per_class_recall": 0.9},
                                 "novel": {"acc1": 0.8, "acc5": 1.0, "mean_per_class_recall": 0.8},
                                 "all": {"acc1": 0.85, "acc5": 1.0, "mean_per_class_recall": 0.8}}},
    }
    weights = tmp_path / "ViT-B-32.safetensors"
    weights.write_bytes(b"")
    models = {"student": ("pand-openvocab-resnet18", "runs/r/checkpoints/best.ckpt"),
              "teacher": ("hf-hub:org/clip", str(weights))}
    records = clip_benchmark_records(report, "cub", models)
    assert all(list(r) == list(CLIP_BENCHMARK_KEYS) and set(r) == FIELDS for r in records)
    assert [(r["dataset"], r["model"], r["task"]) for r in records] == [
        ("cub/base", "pand-openvocab-resnet18", "zeroshot_classification"),
        ("cub/novel", "pand-openvocab-resnet18", "zeroshot_classification"),
        ("cub/all", "pand-openvocab-resnet18", "zeroshot_classification"),
        ("cub", "pand-openvocab-resnet18", "zeroshot_retrieval"),
        ("cub/base", "hf-hub:org/clip", "zeroshot_classification"),
        ("cub/novel", "hf-hub:org/clip", "zeroshot_classification"),
        ("cub/all", "hf-hub:org/clip", "zeroshot_classification")]
    assert {r["language"] for r in records} == {"en"}
    assert records[0]["metrics"] == {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}
    # below 5 classes clip_benchmark's acc5 is undefined (NaN there), not pand's trivial 1
    assert records[1]["metrics"]["acc5"] is None and records[5]["metrics"]["acc5"] is None
    # caption retrieval in clip_benchmark's names only; the class-prompt retrieval is not that quantity
    assert records[3]["metrics"] == {"image_retrieval_recall@1": 0.3, "text_retrieval_recall@1": 0.4,
                                     "image_retrieval_recall@5": 0.7, "text_retrieval_recall@5": 0.8}
    assert not any("R@1" in r["metrics"] for r in records)

    names = [p.name for p in write_clip_benchmark(records, tmp_path / "out")]
    assert names == [clip_benchmark_name(r) for r in records]
    assert names[0] == "cub_base_runs_r_checkpoints_best.ckpt_pand-openvocab-resnet18_en_zeroshot_classification.json"
    assert names[4] == "cub_base_ViT-B-32.safetensors_hf-hub:org_clip_en_zeroshot_classification.json"
    assert clip_benchmark_file_name(records[3]).endswith("_en_zeroshot_retrieval.json")
    assert json.loads((tmp_path / "out" / names[3]).read_text()) == records[3]


def test_a_closed_set_report_names_the_dataset_alone_and_a_caption_set_may_name_its_own():
    report = {"classes": list("abcdef"),
              "student": {"zeroshot": {"all": {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}},
                          "captions": {"dataset": "flickr30k", "image_retrieval_recall@5": 0.5,
                                       "text_retrieval_recall@5": 0.6}},
              "teacher": {"zeroshot": {"all": {"acc1": 0.9, "acc5": 1.0, "mean_per_class_recall": 0.9}},
                          "captions": {}}}
    records = clip_benchmark_records(report, "cifar100", {"student": ("s", "a.ckpt"), "teacher": ("t", "openai")})
    assert [(r["dataset"], r["task"]) for r in records] == [
        ("cifar100", "zeroshot_classification"), ("flickr30k", "zeroshot_retrieval"),
        ("cifar100", "zeroshot_classification")]
    assert records[0]["metrics"]["acc5"] == 1.0  # 6 classes


# -- pand eval -----------------------------------------------------------------------------------------------------
def test_eval_reproduces_the_run_report_and_writes_clip_benchmark_files(trained, tmp_path):
    _, run = trained
    best = run / "checkpoints" / "best.ckpt"
    trained_report = json.loads((run / "open_vocab.json").read_text())
    out = tmp_path / "best.eval.json"
    results = evaluate(best, {"data.num_workers": 0}, out=str(out))

    assert CLOSED_SET_KEYS <= set(results) and set(results) - CLOSED_SET_KEYS == {"open_vocab", "clip_benchmark_dir"}
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    report = results["open_vocab"]
    for key in ("student", "teacher", "class_split", "classes"):
        _same_numbers(report[key], trained_report[key])
    assert len(report["clip_benchmark"]) == len(trained_report["clip_benchmark"]) == 6
    for mine, theirs in zip(report["clip_benchmark"], trained_report["clip_benchmark"]):
        _same_numbers(mine["metrics"], theirs["metrics"])
        assert (mine["dataset"], mine["model"], mine["task"]) == (theirs["dataset"], theirs["model"], theirs["task"])
    student = report["clip_benchmark"][0]
    assert student["pretrained"] == str(best) and student["model"] == "pand-openvocab-resnet18"
    assert report["clip_benchmark"][3]["model"] == "pand-tiny-vit"
    assert report["clip_benchmark"][3]["pretrained"] == "random"
    assert results["test_acc1"] == pytest.approx(report["student"]["base"])

    folder = tmp_path / "best.clip_benchmark"  # the default: beside the results
    assert results["clip_benchmark_dir"] == str(folder)
    files = sorted(folder.iterdir())
    assert sorted(p.name for p in files) == sorted(clip_benchmark_name(r) for r in report["clip_benchmark"])
    assert any(p.name == "cub_base_best.ckpt_pand-openvocab-resnet18_en_zeroshot_classification.json" for p in files)
    for path in files:
        record = json.loads(path.read_text())
        assert set(record) == FIELDS and record["task"] == "zeroshot_classification" and record["language"] == "en"
        assert set(record["metrics"]) == CLASSIFICATION_METRICS
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
        assert record in report["clip_benchmark"]
    rows = clip_benchmark_build(folder)
    assert len(rows) == 6 and {r["model_fullname"] for r in rows} == {f"pand-openvocab-resnet18 {best}",
                                                                       "pand-tiny-vit random"}
    assert all(set(r) == FIELDS - {"metrics"} | CLASSIFICATION_METRICS | {"model_fullname"} for r in rows)


def test_eval_from_the_command_line_writes_the_files_where_told(trained, tmp_path, capsys):
    _, run = trained
    best = run / "checkpoints" / "best.ckpt"
    folder = tmp_path / "results" / "clip_benchmark"
    capsys.readouterr()
    assert main(["eval", f"ckpt_path={best}", "splits=[test]", f"out={tmp_path / 'e.json'}",
                 f"clip_benchmark_dir={folder}", "data.num_workers=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clip_benchmark_dir"] == str(folder) and "val_acc1" not in result
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        clip_benchmark_name(r) for r in result["open_vocab"]["clip_benchmark"])
    assert not (tmp_path / "e.clip_benchmark").exists()


def test_an_unwritable_clip_benchmark_folder_is_refused_before_any_work(trained, tmp_path, monkeypatch, capsys):
    _, run = trained
    best = run / "checkpoints" / "best.ckpt"

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the output folder was checked")

    monkeypatch.setattr("pand.engine.run.load_teacher", refuse)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    assert main(["eval", f"ckpt_path={best}", f"clip_benchmark_dir={blocker}"]) == 2
    assert "clip_benchmark_dir=" in capsys.readouterr().err
    # the default folder beside the results, taken by a file
    (tmp_path / "x.clip_benchmark").write_text("a file")
    with pytest.raises(OutputError, match="clip_benchmark"):
        evaluate(best, {"data.num_workers": 0}, out=str(tmp_path / "x.eval.json"))
    assert not (tmp_path / "x.eval.json").exists()


def test_a_closed_set_checkpoint_is_evaluated_as_before_without_a_teacher(tmp_path, monkeypatch):
    root = make_cub(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(root, run, "method=ce", "trainer.max_epochs=1")]) == 0
    best = run / "checkpoints" / "best.ckpt"

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was loaded to evaluate a closed-set student")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    monkeypatch.setattr("pand.engine.run.load_teacher", refuse)
    results = evaluate(best, {"data.num_workers": 0})
    assert set(results) == CLOSED_SET_KEYS
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.ckpt", "best.eval.json", "last.ckpt"]
    with pytest.raises(ConfigError, match="closed-set student"):
        evaluate(best, {"data.num_workers": 0}, clip_benchmark_dir=str(tmp_path / "cb"))
    assert not (tmp_path / "cb").exists()
