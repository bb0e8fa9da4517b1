"""``pand export format=onnx quantize=int8``: ONNX Runtime's static quantization of a student, calibrated on its
training images, agreeing with the float model."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pand.cli import main
from pand.engine.data import PandDataModule
from pand.errors import ConfigError
from pand.export import export_student
from pand.export_int8 import _Reader, operator_coverage
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A student trained long enough on a fixture of 8 classes that its predictions are not coin flips: int8's
    rounding then moves logits, not decisions."""
    data = make_cub(tmp_path_factory.mktemp("data"), n_classes=8, per_class=12, test_per_class=6)
    run = tmp_path_factory.mktemp("runs") / "int8"
    assert main(["train", *tiny_overrides(data, run, "method=ce", "data.num_classes=8", "trainer.max_epochs=3",
                                          "test=false")]) == 0
    return run / "checkpoints" / "best.ckpt"


def _predictions(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def _fixture_images(meta):
    data = PandDataModule(meta["data"], seed=meta["seed"])
    return np.concatenate([b["image"].numpy() for split in ("train", "val", "test")
                           for b in data.eval_dataloader(split)])


def test_int8_export_agrees_with_its_float_model_and_says_what_it_is(trained, tmp_path, capsys):
    out = tmp_path / "int8"
    capsys.readouterr()
    assert main(["export", f"ckpt_path={trained}", "format=onnx", "quantize=int8", "calibration=32",
                 f"out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(out / "student.int8.onnx"), str(out / "student.onnx"), str(out / "student.json")]
    meta = json.loads((out / "student.json").read_text())
    assert meta["file"] == "student.int8.onnx"
    q = meta["quantization"]
    assert q["float_file"] == "student.onnx" and q["calibration"]["images"] == 32
    assert q["calibration"]["method"] == "minmax" and q["calibration"]["from_splits"] == {"train": 32}
    # every convolution and the classifier of a ResNet-18 run in int8; the global average pool, exported as a
    # ReduceMean that ONNX Runtime's quantizer does not cover, averages in float and is named
    assert q["mac_operators"] == q["int8_mac_operators"] == 21 and list(q["float_operators"]) == ["ReduceMean"]
    assert q["bytes"]["int8"] < q["bytes"]["float"] / 3  # int8 weights: a quarter of the float ones, plus scales

    graph = onnx.load(str(out / "student.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights_scales = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.attribute
                      and any(a.name == "axis" for a in n.attribute)]
    assert weights_scales, "weights are quantized per output channel (DequantizeLinear with an axis)"

    images = _fixture_images(meta)
    assert len(images) == 8 * 12 + 8 * 6
    want = _predictions(out / "student.onnx", images).argmax(-1)
    got = _predictions(out / "student.int8.onnx", images).argmax(-1)
    assert (want == got).mean() >= 0.99


def test_calibration_reads_the_same_seeded_images_every_time(trained, tmp_path):
    first = export_student(trained, "onnx", tmp_path / "a", quantize="int8", calibration=16)
    second = export_student(trained, "onnx", tmp_path / "b", quantize="int8", calibration=16)
    assert (tmp_path / "a" / "student.int8.onnx").read_bytes() == (tmp_path / "b" / "student.int8.onnx").read_bytes()
    assert first["student"]["quantization"]["calibration"]["images"] == 16
    assert second["student"]["quantization"]["top1_agreement_with_float_on_calibration_images"] >= 0.9


@pytest.mark.parametrize("fmt", ["torch_export", "safetensors", "open_clip"])
def test_int8_is_refused_for_other_formats_before_anything_is_written(trained, tmp_path, fmt):
    with pytest.raises(ConfigError, match=f"quantize=int8 is not available for format={fmt}.*format=onnx"):
        export_student(trained, fmt, tmp_path / "out", quantize="int8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, message", [({"calibration": 0}, "calibration=0 is not allowed"),
                                             ({"calibration_method": "mean"}, "calibration_method='mean'"),
                                             ({"quantize": "int4"}, "quantize='int4' is not allowed")])
def test_bad_quantization_options_are_refused(trained, tmp_path, option, message):
    kwargs = {"quantize": "int8", **option}
    with pytest.raises(ConfigError, match=message):
        export_student(trained, "onnx", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_operators_left_float_are_named():
    """A QDQ graph where a MatMul reads dequantized tensors but a LayerNormalization after it reads the float output:
    the MatMul counts as int8, the LayerNormalization is named as float."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], name="dq_w"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        helper.make_node("LayerNormalization", ["y", "g"], ["n"], name="norm"),
        helper.make_node("MatMul", ["n", "w2"], ["o"], name="head"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info("o", f, [1, 2])])
    coverage = operator_coverage(graph)
    assert coverage["mac_operators"] == 2 and coverage["int8_mac_operators"] == 1
    assert coverage["int8_mac_share"] == 0.5
    assert coverage["float_operators"] == {"LayerNormalization": ["norm"], "MatMul": ["head"]}


@pytest.mark.parametrize("method", ["percentile"])  # entropy goes the same way, through histograms (30 s more)
def test_histogram_calibrations_quantize_too(trained, tmp_path, method):
    result = export_student(trained, "onnx", tmp_path / method, quantize="int8", calibration=16,
                            calibration_method=method)
    q = result["student"]["quantization"]
    assert q["calibration"]["method"] == method and q["calibration"]["images"] == 16
    assert q["int8_mac_operators"] == q["mac_operators"] == 21
    assert q["top1_agreement_with_float_on_calibration_images"] >= 0.9


def test_calibration_draws_from_the_unlabelled_training_images_of_a_run_that_had_them(tmp_path):
    from pand.config import compose, to_plain
    from pand.export_int8 import calibration_images

    data = make_cub(tmp_path / "data", n_classes=3, per_class=6, test_per_class=2)
    config = to_plain(compose("train", tiny_overrides(data, tmp_path / "run", "method=kd", "data.samples_per_class=2",
                                                      "data.unlabelled=rest")))
    module = PandDataModule(config["data"], seed=config["seed"])
    labelled, unlabelled = len(module.splits["train"]), len(module.splits["unlabelled"])
    assert labelled and unlabelled
    everything = calibration_images(config, 1000)
    assert everything.sources == {"train": labelled, "unlabelled": unlabelled}
    assert sum(len(b) for b in everything) == labelled + unlabelled
    assert everything.batch_sizes == [len(b) for b in everything]  # known before any image is read
    assert len(_Reader(everything, "image", fixed_batch=1)) == labelled + unlabelled  # row by row
    some = calibration_images(config, 5)
    assert sum(some.sources.values()) == 5 and sum(len(b) for b in some) == 5
    again = calibration_images(config, 5)
    assert all(np.array_equal(a, b) for a, b in zip(some, again))  # the same seeded images
