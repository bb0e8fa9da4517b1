"""A reduced quickstart (two images per class, one epoch) on fixture IDX files, so the main job cannot rot."""

import json

import pytest

from pand.cli import main
from tests.fixtures.datasets import make_fashion_mnist

KEYS = ("teacher_zero_shot", "teacher_coop", "ce", "kd", "vl2lite", "pand")


@pytest.mark.slow
def test_reduced_quickstart_runs_every_stage(tmp_path, capsys):
    root = make_fashion_mnist(tmp_path / "fm", n_train=80, n_test=30)
    out = tmp_path / "qs"
    code = main([
        "quickstart", "--out", str(out), "--per-class", "2", "--val-fraction", "0.5", "--epochs", "1", "--jobs", "2",
        "--coop-epochs", "1", "--data-root", str(root), "--tsne-samples", "30",
        "--unlabelled", "20", "--unlabelled-epochs", "1", "--unlabelled-batch-size", "8", "--protocols",
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in KEYS:
        assert 0.0 <= results[key]["test_acc"] <= 1.0, key
    assert results["seeds"] == [0] and results["per_class"] == 2
    for name in ("report.md", "learning_curves.png", "tsne_compare.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert all(f"| {key} |" in report for key in KEYS)
    # kd, vl2lite and pand again with 20 unlabelled images, side by side with their labelled-only runs
    for key in ("kd", "vl2lite", "pand"):
        assert 0.0 <= results[key + "+unlabelled"]["test_acc"] <= 1.0, key
        summary = json.loads((out / "seed0" / f"{key}+unlabelled" / "summary.json").read_text())
        assert summary["unlabelled_images"] == 20 and summary["labelled_images"] == 10
    assert "ce+unlabelled" not in results and "test top-1 +unlabelled (%)" in report
    printed = capsys.readouterr().out
    assert "pand quickstart" in printed and "total time" in printed
    # two runs at a time: a line per finished run with the time left, each run's output in its own log, phase times
    assert "== 11 student runs, 2 at a time" in printed and "[1/11] seed 0 " in printed and "left" in printed
    assert (out / "seed0" / "kd+unlabelled.log").read_text().strip()
    assert results["workers"] == 2 and set(results["run_seconds"]) == {f"seed0/{k}" for k in (
        *KEYS[2:], "kd+unlabelled", "vl2lite+unlabelled", "pand+unlabelled", "openvocab", "openvocab+strict",
        "openvocab+transductive", "openvocab+label-free")}
    assert "Where the time went" in report and "| t-SNE figures (embedded in the runs) |" in report
    # the labelled runs embedded their own test features (30 images) for the figure, beside their checkpoints
    for key in KEYS[2:]:
        assert (out / "seed0" / key / "tsne_test.npz").is_file() and results["run_seconds"][f"seed0/{key}"][
            "tsne_seconds"] > 0
    assert not (out / "seed0" / "kd+unlabelled" / "tsne_test.npz").exists()
    # The open-vocabulary row: trained on 5 classes, tested on the 5 others too, student next to teacher.
    ov = results["openvocab"]
    assert len(ov["base_classes"]) == 5 and len(ov["novel_classes"]) == 5
    assert not set(ov["base_classes"]) & set(ov["novel_classes"])
    for who in ("student", "teacher"):
        assert all(0.0 <= ov[who][k] <= 1.0 for k in ("base", "novel", "hm", "mAP")), who
    assert "| student |" in report and "novel (%)" in report and "open vocabulary" in printed
    ov_summary = json.loads((out / "seed0" / "openvocab" / "summary.json").read_text())
    assert ov_summary["open_vocab"]["student"]["hm"] == pytest.approx(ov["student"]["hm"])
    # and again with the 20 unlabelled images under each protocol, each row on record with its protocol
    protocols = results["openvocab_protocols"]
    assert set(protocols) == {"strict", "transductive", "label-free"}
    for name, row in protocols.items():
        assert all(0.0 <= row["student"][k] <= 1.0 for k in ("base", "novel", "hm", "mAP")), name
        assert f"| student, {name} |" in report
        summary = json.loads((out / "seed0" / f"openvocab+{name}" / "summary.json").read_text())
        assert summary["open_vocab"]["class_split"]["protocol"] == ("strict" if name == "label-free" else name)
        assert summary["labelled_images"] == (0 if name == "label-free" else 5)  # 5 seen classes x 1
    # the student of each method saw 2 images per class: 1 train + 1 val
    summary = json.loads((out / "seed0" / "pand" / "summary.json").read_text())
    assert summary["method"] == "pand" and summary["test_acc1"] == pytest.approx(results["pand"]["test_acc"])


@pytest.mark.parametrize(("argv", "message"), [
    (["quickstart", "--jobs", "-1"], "--jobs=-1 is not allowed"),
    (["sweep", "--jobs", "0", "method=kd"], "--jobs=0 is not allowed"),
])
def test_a_negative_number_of_side_by_side_runs_is_refused(argv, message, capsys):
    assert main(argv) == 2 and message in capsys.readouterr().err
