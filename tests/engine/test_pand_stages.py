"""PAND's two stages end to end on a fixture dataset with a tiny teacher: stage 1 (features, prompts) reads the
composed ``train`` config, the same config and overrides stage 2 trains with."""

import csv
import json
from pathlib import Path

import pytest
import torch

import pand.stage1.features
from pand.cli import main
from pand.config import compose, to_plain
from pand.errors import ConfigError, PandError
from pand.provenance import load_tensors
from pand.stage1.run import run_features, run_prompts
from pand.stage1.store import read_record, save_text_features
from tests.engine.conftest import tiny_overrides

CLASSES = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]


def stage1_overrides(data_root, runs_dir, *extra):
    return [
        "data=cub", f"data.root={data_root}", "data.num_classes=3", "data.val_fraction=0.2", "teacher=tiny",
        "features.num_workers=0", f"paths.runs_dir={runs_dir}", "prompts.epochs=3", "prompts.n_ctx=4", *extra,
    ]


def stage1_config(data_root, runs_dir, *extra):
    return to_plain(compose("train", stage1_overrides(data_root, runs_dir, *extra)))


def test_stage1_settings_live_in_the_train_config(tmp_path):
    config = to_plain(compose("train", [f"paths.runs_dir={tmp_path}"]))
    assert "device" not in config  # stage 1's device is features.device now
    assert config["features"]["device"] == "auto" and config["features"]["splits"] == ["train", "val", "test"]
    assert config["features"]["dir"] == f"{tmp_path}/features/cub-convnext_xxlarge"
    assert config["prompts"]["out"] == (f"{tmp_path}/features/cub-convnext_xxlarge/"
                                        "learned_text_features-nctx16-end.safetensors")
    assert config["prompts"]["logit_scale"] is None and config["teacher"]["text_features"] is None


def test_features_are_stored_with_provenance_reused_and_refused_when_foreign(cub_root, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert main(["features", *stage1_overrides(cub_root, runs)]) == 0
    out = run_features(stage1_config(cub_root, runs))  # reused
    fdir = runs / "features" / "cub-pand-tiny-vit"
    stored = json.loads(capsys.readouterr().out)  # the result alone on stdout
    assert stored["train"] == {"shape": [15, 32], "file": f"{fdir}/train.safetensors"}
    assert set(out) == {"train", "val", "test"}
    tensors, record = load_tensors(fdir / "train.safetensors")
    assert tensors["embeds"].shape == (15, 32) and tensors["labels"].shape == (15,)
    assert record["teacher"]["model"] == "pand-tiny-vit" and record["split"] == "train"
    assert record["classes"] == CLASSES
    torch.testing.assert_close(tensors["embeds"].norm(dim=1), torch.ones(15))

    def no_extraction(*args, **kwargs):
        raise AssertionError("stored features were recomputed")

    monkeypatch.setattr(pand.stage1.features, "extract_features", no_extraction)
    assert main(["features", *stage1_overrides(cub_root, runs)]) == 0  # reused, not recomputed

    with pytest.raises(PandError) as refused:
        run_features(stage1_config(cub_root, runs, "teacher.pretrained=random:1"))
    assert "refused" in str(refused.value) and "teacher" in str(refused.value)
    assert "features.rebuild=true" in str(refused.value)
    capsys.readouterr()
    assert main(["features", *stage1_overrides(cub_root, runs, "teacher.pretrained=random:1")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "teacher" in err and "features.rebuild=true" in err
    monkeypatch.undo()
    run_features(stage1_config(cub_root, runs, "teacher.pretrained=random:1", "features.rebuild=true"))
    assert load_tensors(fdir / "train.safetensors")[1]["teacher"]["pretrained"] == "random:1"


def test_features_device_is_where_stage1_runs(cub_root, tmp_path, monkeypatch):
    seen = {}

    def fake_teacher(config, device=None, classes=None):
        seen["device"] = device
        raise RuntimeError("stop here")

    monkeypatch.setattr("pand.stage1.run.load_teacher", fake_teacher)
    with pytest.raises(RuntimeError, match="stop here"):
        run_features(stage1_config(cub_root, tmp_path / "runs", "features.device=cpu"))
    assert seen["device"] == "cpu"
    with pytest.raises(RuntimeError, match="stop here"):
        run_prompts(stage1_config(cub_root, tmp_path / "runs"))
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("features.device=tpu", "features.device='tpu' is not allowed"),
        ("prompts.logit_scale=0", "prompts.logit_scale=0 is not allowed"),
        ("prompts.logit_scale=fixed", "prompts.logit_scale='fixed' is not allowed"),
    ],
)
def test_new_stage1_keys_are_validated_before_the_teacher_loads(cub_root, tmp_path, monkeypatch, override, message):
    monkeypatch.setattr("pand.stage1.run.load_teacher",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher loaded")))
    with pytest.raises(ConfigError, match=message):
        run_prompts(stage1_config(cub_root, tmp_path / "runs", override))


@pytest.mark.parametrize("option", [None, "learned", 7.5])
def test_coop_logit_scale_option(cub_root, tmp_path, tiny_teacher, option):
    # null: the configured teacher.logit_scale (20 here); learned: the model's own logit_scale.exp() (1/0.07 at init)
    extra = [] if option is None else [f"prompts.logit_scale={option}"]
    summary = run_prompts(stage1_config(cub_root, tmp_path / "runs", "prompts.epochs=1", "teacher.logit_scale=20",
                                        *extra))
    expected = {None: 20.0, "learned": float(tiny_teacher.model.logit_scale.exp()), 7.5: 7.5}
    assert summary["logit_scale"] == pytest.approx(expected[option])
    assert read_record(summary["text_features"])["logit_scale"] == pytest.approx(expected[option])


def test_pand_experiment_runs_both_stages_without_a_path(cub_root, tmp_path, capsys):
    """`pand prompts experiment=pand/...` then `pand train experiment=pand/...`: stage 2 reads ${prompts.out}."""
    runs = tmp_path / "runs"
    overrides = tiny_overrides(
        cub_root, tmp_path / "stage2", "experiment=pand/cub_resnet18", f"paths.runs_dir={runs}",
        # one CPU process instead of the recipe's 4 GPUs
        "trainer.devices=1", "trainer.sync_batchnorm=false",
        "features.num_workers=0", "prompts.epochs=3", "prompts.n_ctx=4",
    )
    assert main(["prompts", *overrides]) == 0
    streams = capsys.readouterr()
    assert "teacher zero-shot" in streams.err and "teacher CoOp" in streams.err
    assert json.loads(streams.out)["text_features"] == str(runs / "features" / "cub-pand-tiny-vit" /
                                                           "learned_text_features-nctx4-end.safetensors")
    learned = runs / "features" / "cub-pand-tiny-vit" / "learned_text_features-nctx4-end.safetensors"
    assert to_plain(compose("train", overrides))["teacher"]["text_features"] == str(learned)
    record = read_record(learned)
    assert record["n_ctx"] == 4 and record["classes"] == CLASSES
    assert record["templates"] == ["a photo of {}, a type of bird"]  # the authors' CUB prompt, from the experiment
    assert 0 <= record["coop_val_acc"] <= 1 and 0 <= record["zero_shot_test_acc"] <= 1
    report = json.loads(learned.with_suffix(".json").read_text())
    assert {"zero_shot_val_acc", "coop_val_acc", "zero_shot_test_acc", "coop_test_acc", "logit_scale"} <= set(report)

    run = tmp_path / "stage2"
    assert main(["train", *overrides]) == 0  # no teacher.text_features on the command line
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("train/nlrd") for r in rows)
    assert json.loads((run / "summary.json").read_text())["method"] == "pand"


def test_prompts_then_stage2_round_trip(cub_root, tmp_path):
    runs = tmp_path / "runs"
    summary = run_prompts(stage1_config(cub_root, runs))
    learned = runs / "features" / "cub-pand-tiny-vit" / "learned_text_features-nctx4-end.safetensors"
    assert summary["text_features"] == str(learned)
    assert read_record(learned)["n_ctx"] == 4

    run = tmp_path / "stage2"
    assert main(["train", *tiny_overrides(cub_root, run, "method=pand", f"teacher.text_features={learned}")]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("train/nlrd") for r in rows)
    assert json.loads((run / "summary.json").read_text())["method"] == "pand"


@pytest.mark.parametrize("mismatch", ["classes", "teacher"])
def test_mismatched_text_feature_file_is_refused(cub_root, tmp_path, capsys, mismatch):
    classes = list(CLASSES)
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


# -- low-precision teacher passes (features.precision, prompts.precision) ------------------------------------------
FDIR = ("features", "cub-pand-tiny-vit")


def test_bf16_features_agree_with_fp32_and_record_precision_and_agreement(cub_root, tmp_path, capsys):
    reference = run_features(stage1_config(cub_root, tmp_path / "fp32"))
    assert "precision" not in load_tensors(tmp_path.joinpath("fp32", *FDIR, "train.safetensors"))[1]  # fp32 unchanged
    capsys.readouterr()
    assert main(["features", *stage1_overrides(cub_root, tmp_path / "bf16", "features.precision=bf16")]) == 0
    printed = json.loads(capsys.readouterr().out)
    for split, (ref, labels) in reference.items():
        tensors, record = load_tensors(tmp_path.joinpath("bf16", *FDIR, f"{split}.safetensors"))
        assert torch.equal(tensors["labels"], labels)
        rel = (tensors["embeds"] - ref).norm(dim=1) / ref.norm(dim=1)
        assert 0 < float(rel.max()) <= 0.02  # not fp32's numbers, but within the tolerance in every row
        stats = record["agreement"]
        assert record["precision"] == "bf16" and stats["precision"] == "bf16" and stats["tolerance"] == 0.02
        assert stats["rows"] == len(labels) and 0 < stats["max_rel_error"] <= 0.02  # one batch holds the split
        assert printed[split]["agreement"] == stats and printed[split]["precision"] == "bf16"
        assert printed[split]["shape"] == list(ref.shape)

    # reused by a bf16 run; refused by an fp32 run, and the reason names the precision
    run_features(stage1_config(cub_root, tmp_path / "bf16", "features.precision=bf16"))
    with pytest.raises(PandError) as refused:
        run_features(stage1_config(cub_root, tmp_path / "bf16"))
    assert "precision: stored 'bf16', expected None" in str(refused.value)
    assert "features.precision=bf16" in str(refused.value)


def test_features_refused_by_the_agreement_check_are_not_written(cub_root, tmp_path):
    from pand.errors import PrecisionError

    strict = ("features.precision=bf16", "features.precision_tolerance=1e-9")
    with pytest.raises(PrecisionError) as refused:
        run_features(stage1_config(cub_root, tmp_path / "runs", *strict))
    assert not list(tmp_path.joinpath("runs", *FDIR).glob("*.safetensors"))
    measured = run_features(stage1_config(cub_root, tmp_path / "other", "features.precision=bf16"))
    assert measured  # the same pass with the default tolerance
    stats = load_tensors(tmp_path.joinpath("other", *FDIR, "train.safetensors"))[1]["agreement"]
    assert (f"max relative L2 error {stats['max_rel_error']:.3g} > tolerance features.precision_tolerance=1e-09"
            in str(refused.value))
    assert "features.precision=fp32" in str(refused.value)

    # a stored fp32 file that a refused bf16 rebuild would replace stays as it was
    run_features(stage1_config(cub_root, tmp_path / "runs"))
    train = tmp_path.joinpath("runs", *FDIR, "train.safetensors")
    before = train.read_bytes()
    with pytest.raises(PrecisionError):
        run_features(stage1_config(cub_root, tmp_path / "runs", *strict, "features.rebuild=true"))
    assert train.read_bytes() == before


def test_bf16_prompts_report_the_agreement_of_their_fp32_text_features(cub_root, tmp_path):
    summary = run_prompts(stage1_config(cub_root, tmp_path / "runs", "prompts.epochs=2", "prompts.precision=bf16"))
    stats = summary["text_features_agreement"]
    assert summary["precision"] == "bf16" and stats["precision"] == "bf16"
    assert stats["rows"] == 3 and 0 < stats["max_rel_error"] <= 0.02
    assert "features_agreement" not in summary  # the features themselves are fp32 here
    record = read_record(summary["text_features"])
    assert record["text_features_agreement"] == stats and record["precision"] == "bf16"
    report = json.loads(Path(summary["text_features"]).with_suffix(".json").read_text())
    assert report["text_features_agreement"] == stats

    both = run_prompts(stage1_config(cub_root, tmp_path / "runs2", "prompts.epochs=1", "prompts.precision=fp16",
                                     "features.precision=bf16"))
    assert both["features_precision"] == "bf16" and set(both["features_agreement"]) == {"train", "val", "test"}
    assert both["text_features_agreement"]["precision"] == "fp16"
    plain = run_prompts(stage1_config(cub_root, tmp_path / "runs3", "prompts.epochs=1"))
    assert not {"precision", "text_features_agreement", "features_agreement"} & set(plain)
