"""``pand predict`` and ``pand.deploy.load_student``: closed-set and open-vocabulary students on image files."""

import csv
import json

import pytest
import torch
from PIL import Image

from pand.cli import main
from pand.deploy import load_student
from pand.errors import ConfigError, CorruptImageError
from pand.predict import find_images, predict, read_class_names
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_cub(root / "data", n_classes=3, per_class=4, test_per_class=2)
    closed, openvocab = root / "ce", root / "ov"
    assert main(["train", *tiny_overrides(data, closed, "method=ce", "trainer.max_epochs=1")]) == 0
    assert main(["train", *tiny_overrides(data, openvocab, "method=openvocab", "trainer.max_epochs=1")]) == 0
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    for i, src in enumerate(sorted((data / "images").rglob("*.jpg"))[:5]):
        Image.open(src).save(images / ("nested" if i % 2 else ".") / f"img{i}.png")
    return {"data": data, "ce": closed / "checkpoints" / "best.ckpt", "ov": openvocab / "checkpoints" / "best.ckpt",
            "images": images}


def test_load_student_gives_model_preprocessing_and_class_names(runs):
    model, preprocess, names = loaded = load_student(runs["ce"])
    assert loaded.config["method"]["name"] == "ce"
    assert names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    x = preprocess(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert x.shape == (3, 32, 32) and not model.training
    assert model(x[None]).shape == (1, 3)
    with pytest.raises(ConfigError, match="closed-set student"):
        load_student(runs["ce"], ["cat", "dog"])
    assert load_student(runs["ce"], names).class_names == names  # its own classes are fine


def test_predict_folder_writes_csv_and_json_with_sorted_topk(runs, tmp_path):
    files = find_images(runs["images"])
    assert len(files) == 5  # recursive
    rows = predict(runs["ce"], runs["images"], topk=2, out=str(tmp_path / "p.csv"))
    assert [r["image"] for r in rows] == [str(f) for f in files]
    names = load_student(runs["ce"]).class_names
    for row in rows:
        probs = [t["probability"] for t in row["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["label"] in names for t in row["top"])
    table = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(table) == 10 and table[0]["rank"] == "1" and table[0]["label"] == rows[0]["top"][0]["label"]
    # The probabilities are the student's softmax on the evaluation preprocessing.
    model, preprocess, _ = load_student(runs["ce"])
    with torch.no_grad():
        p = model(preprocess(Image.open(files[0]).convert("RGB"))[None]).softmax(-1)[0]
    assert rows[0]["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    predict(runs["ce"], str(runs["images"] / "*.png"), topk=10, out=str(tmp_path / "p.json"))
    stored = json.loads((tmp_path / "p.json").read_text())
    assert len(stored) == 3 and len(stored[0]["top"]) == 3  # topk clamped to the class count


def test_open_vocabulary_student_takes_any_class_names(runs, tmp_path, capsys):
    names_file = tmp_path / "names.txt"
    names_file.write_text("red bird\nblue bird\n\ngreen bird\nsea gull\n")
    rows = predict(runs["ov"], runs["images"], topk=4, classes_file=str(names_file))
    assert {t["label"] for r in rows for t in r["top"]} <= {"red bird", "blue bird", "green bird", "sea gull"}
    assert all(len(r["top"]) == 4 for r in rows)
    capsys.readouterr()
    assert main(["predict", f"ckpt_path={runs['ov']}", f"images={runs['images']}", "topk=1",
                 "classes=[heron,albatross]"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 5 and printed[0]["top"][0]["label"] in ("heron", "albatross")


def test_predict_refuses_bad_input_with_the_reason(runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="neither an image file"):
        find_images(tmp_path / "nothing-*.jpg")
    with pytest.raises(ConfigError, match="distinct"):
        read_class_names("cat,dog,cat", None)
    with pytest.raises(ConfigError, match=".csv or .json"):
        predict(runs["ce"], runs["images"], out=str(tmp_path / "p.txt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        predict(runs["ce"], broken)
    assert main(["predict", f"ckpt_path={runs['ce']}"]) == 2
    assert "needs images=" in capsys.readouterr().err


def test_predict_and_export_refuse_unknown_and_missing_options_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("pand.predict.load_student", lambda *a, **k: pytest.fail("loaded before checking options"))
    assert main(["predict", "ckpt_path=x.ckpt", "images=a.jpg", "top_k=3"]) == 2
    assert "unknown argument 'top_k=3'" in capsys.readouterr().err
    assert main(["export", "ckpt_path=x.ckpt", "format=onnx"]) == 2
    assert "pand export needs out=..." in capsys.readouterr().err
    assert main(["export", "ckpt_path=x.ckpt", "format=onnx", "out=o", "classes=[a,b]"]) == 2
    assert "unknown argument 'classes=[a,b]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- options checked first
@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A file standing for a checkpoint and a folder of images; loading a student fails the test."""
    monkeypatch.setattr("pand.predict.load_student", lambda *a, **k: pytest.fail("loaded before checking options"))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "student.ckpt").write_bytes(b"not read")
    (tmp_path / "a_folder").mkdir()
    return [f"ckpt_path={tmp_path / 'student.ckpt'}", f"images={tmp_path / 'images'}"]


@pytest.mark.parametrize(("option", "message"), [
    ("topk=abc", "topk='abc' is not allowed: expected an integer >= 1"),
    ("topk=0", "topk=0 is not allowed: expected an integer >= 1"),
    ("topk=2.5", "topk=2.5 is not allowed: expected an integer >= 1"),
    ("batch_size=0", "batch_size=0 is not allowed: expected an integer >= 1"),
    ("num_workers=-1", "num_workers=-1 is not allowed: expected an integer >= 0"),
    ("device=tpu", "device='tpu' is not allowed: expected auto, cpu, cuda, cuda:N or mps"),
    ("device=cuda:x", "device='cuda:x' is not allowed: expected auto, cpu, cuda, cuda:N or mps (did you mean 'cuda'?)"),
    ("classes=[a,a]", "classes=['a', 'a']: class names must be distinct; repeated: 'a'"),
    ("classes=[]", "classes=[]: the list of class names is empty"),
    ("out=preds.txt", "out='preds.txt' is not allowed: the file name must end in .csv or .json"),
])
def test_predict_refuses_a_bad_option_in_one_line_before_loading(option, message, inputs, capsys):
    assert main(["predict", *inputs, option]) == 2
    assert capsys.readouterr().err == f"pand predict: error: invalid option: {message}\n"


def test_predict_refuses_unreadable_lists_missing_inputs_and_a_folder_as_out(inputs, tmp_path, capsys):
    assert main(["predict", *inputs, "classes=[a,b"]) == 2
    assert capsys.readouterr().err == ("pand predict: error: cannot read 'classes=[a,b': expected ',' or ']', but got "
                                       "'<stream end>'; check its brackets and quotes (a list is written key=[a,b])\n")
    folder = tmp_path / "a_folder"
    # The folder used to be found when the file was written, after every image had been classified.
    assert main(["predict", *inputs, f"out={folder}"]) == 2
    assert capsys.readouterr().err == (f"pand predict: error: invalid option: out='{folder}' is a folder; expected a "
                                       "file name ending in .csv or .json\n")
    assert main(["predict", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"images={tmp_path / 'images'}"]) == 2
    assert f"ckpt_path='{tmp_path / 'nope.ckpt'}': no such file; expected a checkpoint file" in capsys.readouterr().err
    assert main(["predict", inputs[0], f"images={tmp_path / 'none' / '*.jpg'}"]) == 2
    assert "the pattern matches no file" in capsys.readouterr().err
    assert main(["predict", *inputs, f"classes_file={folder}"]) == 2
    assert "is a folder; expected a text file with one class name per line" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is a folder; expected a file name ending in .csv or .json"):
        predict(tmp_path / "student.ckpt", tmp_path / "images", out=str(folder))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_predict_refuses_cuda_on_a_machine_without_one(inputs, capsys):
    assert main(["predict", *inputs, "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand predict: error: invalid option: device='cuda' is not available: this machine has no "
                          "CUDA GPU (torch ") and err.endswith("; use device=cpu or device=auto\n")


def test_predict_options_are_refused_before_torch_is_imported(tmp_path):
    from tests.test_cli import run_in_clean_interpreter

    (tmp_path / "student.ckpt").write_bytes(b"not read")
    rc, out, err, heavy = run_in_clean_interpreter("predict", f"ckpt_path={tmp_path / 'student.ckpt'}",
                                                   f"images={tmp_path}", "topk=abc")
    assert rc == 2 and out == "" and "topk='abc' is not allowed" in err
    assert heavy == []


# ---------------------------------------------------------------------------------------- CSV safe for spreadsheets
DANGEROUS = ["=HYPERLINK(\"http://x\",\"y\")", "+SUM(1)", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def test_spreadsheet_cells_escape_formula_text_and_keep_numbers():
    from pand.spreadsheet import spreadsheet_cell

    assert [spreadsheet_cell(s) for s in DANGEROUS] == ["'" + s for s in DANGEROUS]
    for kept in ("cat", "a=b", " =x", "-0.25", "+1", "-1e-05", "0.5", "", -0.25, 3, None):
        assert spreadsheet_cell(kept) == kept
    assert spreadsheet_cell("-inf") == "'-inf" and spreadsheet_cell("-1,5") == "'-1,5"


def test_predictions_csv_escapes_class_names_and_paths_but_the_json_keeps_them(tmp_path):
    from pand.predict import write_predictions

    rows = [{"image": "=image.png", "top": [{"label": name, "probability": 0.5} for name in DANGEROUS]},
            {"image": "b.png", "top": [{"label": "heron", "probability": 0.125}]}]
    write_predictions(rows, tmp_path / "p.csv")
    write_predictions(rows, tmp_path / "p.json")
    table = list(csv.DictReader((tmp_path / "p.csv").open(newline="")))
    assert [r["label"] for r in table] == ["'" + s for s in DANGEROUS] + ["heron"]
    assert table[0]["image"] == "'=image.png" and table[-1]["image"] == "b.png"
    assert [r["probability"] for r in table] == ["0.500000"] * 6 + ["0.125000"]
    assert json.loads((tmp_path / "p.json").read_text()) == rows


def test_an_open_vocabulary_class_with_a_formula_name_is_escaped_in_the_csv_only(runs, tmp_path):
    names = DANGEROUS[:4]  # class names are stripped, so a leading tab or CR never reaches them
    rows = predict(runs["ov"], runs["images"], topk=4, classes=names, out=str(tmp_path / "p.csv"))
    predict(runs["ov"], runs["images"], topk=4, classes=names, out=str(tmp_path / "p.json"))
    table = list(csv.DictReader((tmp_path / "p.csv").open(newline="")))
    assert {r["label"] for r in table} == {"'" + n for n in names}
    assert all(float(r["probability"]) >= 0 for r in table)
    assert {t["label"] for r in json.loads((tmp_path / "p.json").read_text()) for t in r["top"]} == set(names)
    assert {t["label"] for r in rows for t in r["top"]} == set(names)
