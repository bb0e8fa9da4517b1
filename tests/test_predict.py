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
    monkeypatch.setattr("pand.deploy.load_student", lambda *a, **k: pytest.fail("loaded before checking options"))
    assert main(["predict", "ckpt_path=x.ckpt", "images=a.jpg", "top_k=3"]) == 2
    assert "unknown argument 'top_k=3'" in capsys.readouterr().err
    assert main(["export", "ckpt_path=x.ckpt", "format=onnx"]) == 2
    assert "pand export needs out=..." in capsys.readouterr().err
    assert main(["export", "ckpt_path=x.ckpt", "format=onnx", "out=o", "classes=[a,b]"]) == 2
    assert "unknown argument 'classes=[a,b]'" in capsys.readouterr().err
