"""PAND's two stages end to end through the command line, on a fixture dataset with a tiny teacher."""

import csv
import json

import pytest
import torch

import pand.features
from pand.cli import main
from pand.prompts.store import read_record, save_text_features
from pand.provenance import load_tensors
from tests.engine.conftest import tiny_overrides


def stage1_overrides(data_root, runs_dir, *extra):
    return [
        "data=cub", f"data.root={data_root}", "data.num_classes=3", "data.val_fraction=0.2", "teacher=tiny",
        "features.num_workers=0", f"paths.runs_dir={runs_dir}", "prompts.epochs=3", "prompts.n_ctx=4", *extra,
    ]


def test_features_are_stored_with_provenance_reused_and_refused_when_foreign(cub_root, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert main(["features", *stage1_overrides(cub_root, runs)]) == 0
    fdir = runs / "features" / "cub-pand-tiny-vit"
    tensors, record = load_tensors(fdir / "train.safetensors")
    assert tensors["embeds"].shape == (15, 32) and tensors["labels"].shape == (15,)
    assert record["teacher"]["model"] == "pand-tiny-vit" and record["split"] == "train"
    assert record["classes"] == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    torch.testing.assert_close(tensors["embeds"].norm(dim=1), torch.ones(15))

    def no_extraction(*args, **kwargs):
        raise AssertionError("stored features were recomputed")

    monkeypatch.setattr(pand.features, "extract_features", no_extraction)
    assert main(["features", *stage1_overrides(cub_root, runs)]) == 0  # reused, not recomputed

    capsys.readouterr()
    assert main(["features", *stage1_overrides(cub_root, runs, "teacher.pretrained=random:1")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "teacher" in err and "features.rebuild=true" in err
    monkeypatch.undo()
    assert main(["features", *stage1_overrides(cub_root, runs, "teacher.pretrained=random:1", "features.rebuild=true")]) == 0
    assert load_tensors(fdir / "train.safetensors")[1]["teacher"]["pretrained"] == "random:1"


def test_prompts_then_stage2_round_trip(cub_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["prompts", *stage1_overrides(cub_root, runs)]) == 0
    out = capsys.readouterr().out
    assert "teacher zero-shot" in out and "teacher CoOp" in out
    learned = runs / "features" / "cub-pand-tiny-vit" / "learned_text_features-nctx4-end.safetensors"
    record = read_record(learned)
    assert record["n_ctx"] == 4 and len(record["classes"]) == 3
    assert 0 <= record["coop_val_acc"] <= 1 and 0 <= record["zero_shot_test_acc"] <= 1
    report = json.loads(learned.with_suffix(".json").read_text())
    assert {"zero_shot_val_acc", "coop_val_acc", "zero_shot_test_acc", "coop_test_acc"} <= set(report)

    run = tmp_path / "stage2"
    assert main(["train", *tiny_overrides(cub_root, run, "method=pand", f"teacher.text_features={learned}")]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("train/nlrd") for r in rows)
    assert json.loads((run / "summary.json").read_text())["method"] == "pand"


@pytest.mark.parametrize("mismatch", ["classes", "teacher"])
def test_mismatched_text_feature_file_is_refused(cub_root, tmp_path, capsys, mismatch):
    classes = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    from pand.teachers import load_clip_teacher

    identity = load_clip_teacher("pand-tiny-vit", "random").identity
    if mismatch == "classes":
        classes = classes[::-1]
    else:
        identity = {**identity, "weights": "0" * 64}
    path = tmp_path / "foreign.safetensors"
    save_text_features(path, torch.randn(3, 32), {"teacher": identity, "classes": classes})
    code = main(["train", *tiny_overrides(cub_root, tmp_path / "run", "method=pand", f"teacher.text_features={path}")])
    assert code == 2
    err = capsys.readouterr().err
    assert "refused" in err and mismatch in err
