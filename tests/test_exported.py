"""Evaluate what ships: ``pand eval model=...`` and ``pand predict`` on the files ``pand export`` writes give the
numbers of the checkpoint they came from, read with the ``student.json`` beside them."""

import json
import shutil
import sys

import pytest
import torch
from PIL import Image

from pand.cli import main
from pand.deploy import load_student
from pand.errors import ConfigError
from pand.export import export_student
from pand.predict import predict
from pand.students.exported import METADATA_NAME, MODEL_FILES, ExportedModel, load_exported
from tests.engine.conftest import tiny_overrides

# A CIFAR resnet8 keeps training, export and evaluation to seconds.
SMALL = ("student=cifar", "student.name=resnet8")
SCORES = ("val_acc1", "val_acc5", "test_acc1", "test_acc5")


def _train(data, run, *extra):
    assert main(["train", *tiny_overrides(data, run, "trainer.max_epochs=1", "test=false", *SMALL, *extra)]) == 0
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    return _train(data, tmp_path_factory.mktemp("runs") / "ce", "method=ce")


@pytest.fixture(scope="module")
def ckpt_eval(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_eval") / "best.eval.json"
    assert main(["eval", f"ckpt_path={ckpt}", f"out={out}"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def onnx_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_student(ckpt, "onnx", out)
    return out


@pytest.fixture(scope="module")
def images(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, src in enumerate(sorted((data / "images").rglob("*.jpg"))[::3]):
        Image.open(src).save(folder / f"img{i}.png")
    return folder


def _eval(capsys, *args):
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _same_scores(got, want):
    for key in SCORES:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert got["val_size"] == want["val_size"] and got["test_size"] == want["test_size"]


def _logits(model, n=5, side=32):
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x)


def test_the_names_are_those_pand_export_writes():
    from pand.export import FILE_NAMES
    from pand.export import METADATA_NAME as EXPORT_METADATA

    assert METADATA_NAME == EXPORT_METADATA
    assert MODEL_FILES == (FILE_NAMES["onnx"], FILE_NAMES["torch_export"])


def test_eval_of_the_onnx_file_gives_the_checkpoint_numbers(ckpt, ckpt_eval, onnx_dir, capsys):
    model_file = onnx_dir / "student.onnx"
    got = _eval(capsys, f"model={model_file}")
    _same_scores(got, ckpt_eval)
    assert set(got) - {"model", "format", "runtime", "model_sha256", "exported_from"} == set(ckpt_eval) - {
        "checkpoint"}
    assert got["model"] == str(model_file) and got["format"] == "onnx"
    assert got["runtime"].startswith("onnxruntime ") and "CPUExecutionProvider" in got["runtime"]
    assert got["exported_from"]["path"] == str(ckpt.absolute()) and len(got["model_sha256"]) == 64
    # beside the model, under its whole name: student.int8.onnx's results would not overwrite these
    assert json.loads((onnx_dir / "student.onnx.eval.json").read_text()) == got
    # The logits behind the numbers: the ONNX model in onnxruntime against the checkpoint's student in torch.
    diff = (_logits(load_student(model_file).model) - _logits(load_student(ckpt).model)).abs().max().item()
    assert diff < 1e-4


def test_eval_of_the_torch_export_folder_gives_the_checkpoint_numbers(ckpt, ckpt_eval, tmp_path, capsys):
    export_student(ckpt, "torch_export", tmp_path / "pt2")
    got = _eval(capsys, f"model={tmp_path / 'pt2'}", f"out={tmp_path / 'pt2.json'}")  # the folder names its file
    _same_scores(got, ckpt_eval)
    assert got["model"] == str(tmp_path / "pt2" / "student.pt2") and got["format"] == "torch_export"
    assert got["runtime"].startswith("torch ") and (tmp_path / "pt2.json").is_file()
    diff = (_logits(load_student(tmp_path / "pt2").model) - _logits(load_student(ckpt).model)).abs().max().item()
    assert diff < 1e-4


def test_each_model_file_of_a_folder_gets_its_own_results(onnx_dir, tmp_path, capsys):
    # an int8 file sits beside the float one and shares its student.json (here a copy of the float graph)
    folder = tmp_path / "both"
    shutil.copytree(onnx_dir, folder)
    shutil.copy(folder / "student.onnx", folder / "student.int8.onnx")
    float_results = _eval(capsys, f"model={folder / 'student.onnx'}", "splits=[test]")
    int8_results = _eval(capsys, f"model={folder / 'student.int8.onnx'}", "splits=[test]")
    assert int8_results["model"] == str(folder / "student.int8.onnx")
    assert json.loads((folder / "student.int8.onnx.eval.json").read_text()) == int8_results
    assert json.loads((folder / "student.onnx.eval.json").read_text()) == float_results
    assert "val_acc1" not in int8_results and int8_results["test_acc1"] == float_results["test_acc1"]


def test_a_fixed_batch_model_takes_any_batch(ckpt, ckpt_eval, images, tmp_path, monkeypatch, capsys):
    def no_dynamic_batch():
        raise RuntimeError("no dynamic batch here")

    monkeypatch.setattr("pand.export_programs._dynamic_batch", no_dynamic_batch)
    meta = export_student(ckpt, "onnx", tmp_path / "fixed")["student"]
    assert meta["dynamic_batch"] is False and meta["input"]["shape"][0] == 1
    loaded = load_student(tmp_path / "fixed" / "student.onnx")
    assert loaded.model.batch_size == 1
    diff = (_logits(loaded.model) - _logits(load_student(ckpt).model)).abs().max().item()
    assert diff < 1e-4
    _same_scores(_eval(capsys, f"model={tmp_path / 'fixed' / 'student.onnx'}"), ckpt_eval)  # batches of 4
    rows = predict(tmp_path / "fixed" / "student.onnx", images, topk=2, batch_size=3)
    assert len(rows) == len(list(images.iterdir()))
    export_student(ckpt, "torch_export", tmp_path / "fixed_pt2")
    program = load_student(tmp_path / "fixed_pt2").model
    assert program.batch_size == 1
    assert (_logits(program) - _logits(load_student(ckpt).model)).abs().max().item() < 1e-4


def test_a_graph_fixed_at_a_larger_batch_runs_on_padded_slices():
    class Fixed(ExportedModel):
        def _run(self, images):
            assert len(images) == 4
            return images.mean(dim=(2, 3))

    model = Fixed.__new__(Fixed)
    torch.nn.Module.__init__(model)
    model.batch_size = 4
    x = torch.randn(7, 3, 2, 2)
    torch.testing.assert_close(model(x), x.mean(dim=(2, 3)))


def test_predict_on_the_onnx_file_gives_the_checkpoint_predictions(ckpt, onnx_dir, images, capsys):
    want = predict(ckpt, images, topk=3)
    got = predict(onnx_dir / "student.onnx", images, topk=3, batch_size=2)
    assert [r["image"] for r in got] == [r["image"] for r in want]
    for g, w in zip(got, want):
        assert [t["label"] for t in g["top"]] == [t["label"] for t in w["top"]]
        for gt, wt in zip(g["top"], w["top"]):
            assert gt["probability"] == pytest.approx(wt["probability"], abs=1e-4)
    capsys.readouterr()
    assert main(["predict", f"model={onnx_dir}", f"images={images}", "topk=3"]) == 0  # model= and a folder
    printed = json.loads(capsys.readouterr().out)
    assert [[t["label"] for t in r["top"]] for r in printed] == [[t["label"] for t in r["top"]] for r in want]
    names = load_exported(onnx_dir).class_names
    assert load_student(onnx_dir / "student.onnx", names).class_names == names
    with pytest.raises(ConfigError, match="the vocabulary is fixed in an exported model"):
        load_student(onnx_dir / "student.onnx", ["heron", "gull", "tern"])
    assert main(["predict", f"ckpt_path={ckpt}", f"model={onnx_dir}", f"images={images}"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_model_without_its_student_json_is_refused_naming_it(onnx_dir, images, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(onnx_dir / "student.onnx", lone / "student.onnx")
    missing = lone / "student.json"
    assert main(["eval", f"model={lone / 'student.onnx'}"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} is missing" in err and err.count("\n") == 1
    assert main(["predict", f"ckpt_path={lone / 'student.onnx'}", f"images={images}"]) == 2
    assert f"{missing} is missing" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is missing"):
        load_exported(lone)
    assert not list(lone.glob("*.eval.json"))


def test_eval_refuses_bad_combinations_before_loading(ckpt, onnx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pand.engine.run.load_exported", lambda *a: pytest.fail("loaded before the options"))
    cases = {
        (f"ckpt_path={ckpt}", f"model={onnx_dir / 'student.onnx'}"): "not both",
        (f"model={onnx_dir / 'student.onnx'}", "trainer.precision=16-mixed"): "data.KEY=VALUE overrides only",
        (f"model={onnx_dir / 'student.onnx'}", f"clip_benchmark_dir={tmp_path}"): "needs the checkpoint",
        (f"model={tmp_path / 'nope.onnx'}",): "no such file or folder",
        (f"model={ckpt}",): "is not an exported model",
        (f"model={tmp_path}",): "holds neither student.onnx nor student.pt2",
        (f"model={onnx_dir / 'student.onnx'}", "data.batch_size=0"): "expected an integer >= 1",
    }
    for args, message in cases.items():
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_data_overrides_reach_an_exported_model(onnx_dir, data, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(data, moved / data.name)
    got = _eval(capsys, f"model={onnx_dir / 'student.onnx'}", f"data.root={moved / data.name}", "data.batch_size=2",
                f"out={tmp_path / 'r.json'}", "splits=[test]")
    assert got["test_size"] > 0
    capsys.readouterr()
    assert main(["eval", f"model={onnx_dir / 'student.onnx'}", "data.rooot=/x"]) == 2
    assert "data.rooot" in capsys.readouterr().err


def test_an_open_vocabulary_export_is_scored_on_its_classes_with_a_note(data, tmp_path, capsys):
    ov = _train(data, tmp_path / "ov", "method=openvocab")
    export_student(ov, "onnx", tmp_path / "onnx")
    got = _eval(capsys, f"model={tmp_path / 'onnx'}")
    assert "open_vocab" not in got and "the open-vocabulary report" in got["note"] and str(ov.absolute()) in got["note"]
    assert 0 <= got["test_acc1"] <= 1
    diff = (_logits(load_student(tmp_path / "onnx").model) - _logits(load_student(ov).model)).abs().max().item()
    assert diff < 1e-4


def test_an_exported_model_is_not_exported_again(onnx_dir, tmp_path, capsys):
    assert main(["export", f"ckpt_path={onnx_dir / 'student.onnx'}", "format=torch_export", f"out={tmp_path}"]) == 2
    assert "is an exported model; export from the checkpoint it came from" in capsys.readouterr().err


def test_onnx_without_onnxruntime_names_the_extra(onnx_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ConfigError, match=r"needs onnxruntime \(pip install pand\[export\]\)"):
        load_exported(onnx_dir / "student.onnx")
