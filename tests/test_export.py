"""``pand export``: ONNX, torch.export and safetensors students that run without pand and give pand's logits."""

import json
import os

import pytest
import torch

from pand.cli import main
from pand.deploy import load_student, preprocessing
from pand.errors import ConfigError
from pand.export import export_student
from pand.io import is_output_folder
from tests.engine.conftest import tiny_overrides


def _train(data, run, *extra):
    # method=ce never loads the teacher; one epoch (no test pass) is enough for weights that are not the initial ones.
    assert main(["train", *tiny_overrides(data, run, "method=ce", "trainer.max_epochs=1", "test=false", *extra)]) == 0
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def resnet18_ckpt(data, tmp_path_factory):
    return _train(data, tmp_path_factory.mktemp("runs") / "resnet18")


def _images(n=3, side=32):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(7))


def _reference(ckpt, x):
    loaded = load_student(ckpt)
    with torch.no_grad():
        return loaded, loaded.model(x)


def test_onnx_through_the_cli_gives_the_student_logits_in_onnxruntime(resnet18_ckpt, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=onnx", f"out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(out / "student.onnx"), str(out / "student.json")]
    meta = json.loads((out / "student.json").read_text())
    assert meta == printed["student"]
    assert is_output_folder(out)  # pand made the folder: no image walk will read it as input

    x = _images()
    loaded, want = _reference(resnet18_ckpt, x)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (x, x[:1]):  # the batch dimension stays dynamic
        got = torch.from_numpy(session.run(["logits"], {"image": batch.numpy()})[0])
        torch.testing.assert_close(got, want[: len(batch)], atol=1e-4, rtol=1e-4)

    assert meta["format"] == "onnx" and meta["file"] == "student.onnx" and meta["dynamic_batch"] is True
    assert meta["preprocessing"] == preprocessing(loaded.config)
    assert meta["class_names"] == loaded.class_names and len(meta["class_names"]) == 3
    arch = meta["architecture"]
    assert (arch["source"], arch["name"], arch["head_name"], arch["num_classes"], arch["image_size"]) == (
        "torchvision", "resnet18", "fc", 3, 32)
    assert meta["checkpoint"]["path"] == str(resnet18_ckpt.absolute()) and len(meta["checkpoint"]["sha256"]) == 64
    assert meta["pand_version"]


def test_torch_export_program_gives_the_student_logits(resnet18_ckpt, tmp_path):
    result = export_student(resnet18_ckpt, "torch_export", tmp_path / "pt2")
    assert result["student"]["dynamic_batch"] is True
    program = torch.export.load(tmp_path / "pt2" / "student.pt2")
    x = _images()
    _, want = _reference(resnet18_ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(program.module()(x[:1]), want[:1], atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "pt2" / "student.json").read_text())["file"] == "student.pt2"


def test_safetensors_load_strictly_into_plain_torchvision(resnet18_ckpt, tmp_path):
    import torchvision
    from safetensors.torch import load_file

    result = export_student(resnet18_ckpt, "safetensors", tmp_path)
    state = load_file(tmp_path / "student.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert "fc.weight" in state and not any(k.startswith(("backbone.", "linear_cls.")) for k in state)
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(state, strict=True)
    x = _images()
    _, want = _reference(resnet18_ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, atol=1e-5, rtol=1e-5)
    meta = result["student"]
    assert meta["loads_into_library"] is True
    assert meta["load"]["call"] == "torchvision.models.get_model('resnet18', num_classes=3)"


def test_safetensors_of_a_timm_student_load_strictly_into_timm(data, tmp_path):
    import timm
    from safetensors.torch import load_file

    ckpt = _train(data, tmp_path / "run", "student=timm", "student.name=resnet10t", "student.pretrained=false")
    meta = export_student(ckpt, "safetensors", tmp_path / "out")["student"]
    assert meta["architecture"]["head_name"] == "fc" and meta["loads_into_library"] is True
    plain = timm.create_model("resnet10t", num_classes=3, **meta["load"]["kwargs"])
    plain.load_state_dict(load_file(tmp_path / "out" / "student.safetensors"), strict=True)
    x = _images()
    _, want = _reference(ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, atol=1e-5, rtol=1e-5)


def test_an_unwritable_out_folder_is_refused_before_any_work(resnet18_ckpt, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the student was loaded before the out folder was checked")

    monkeypatch.setattr("pand.export.load_student", refuse)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=safetensors", f"out={blocker / 'out'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=onnx", f"out={locked}"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_missing_onnx_packages_name_the_extra(resnet18_ckpt, tmp_path, monkeypatch, capsys):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    with pytest.raises(ConfigError, match=r"pip install pand\[export\]"):
        export_student(resnet18_ckpt, "onnx", tmp_path)
    assert not list(tmp_path.iterdir())
    assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=tflite", f"out={tmp_path}"]) == 2
    assert "format='tflite' is not allowed: expected one of 'onnx', 'torch_export', 'safetensors', 'open_clip', " \
           "'timm'" in \
        capsys.readouterr().err


def test_open_vocabulary_student_exports_its_text_matrix_and_onnx_logits(data, tmp_path):
    import onnxruntime as ort
    from safetensors.torch import load_file

    run = tmp_path / "run"
    # A CIFAR resnet8 student keeps training and the ONNX export of this test to a few seconds.
    small = ("student=cifar", "student.name=resnet8")
    assert main(["train", *tiny_overrides(data, run, "method=openvocab", "trainer.max_epochs=1", "test=false", *small)]) == 0
    ckpt = run / "checkpoints" / "best.ckpt"
    meta = export_student(ckpt, "onnx", tmp_path / "onnx")["student"]
    x = _images()
    loaded, want = _reference(ckpt, x)
    vocab = meta["open_vocabulary"]
    torch.testing.assert_close(torch.tensor(vocab["text_matrix"]), loaded.model.vocabulary)
    assert vocab["logit_scale"] == pytest.approx(float(loaded.model.logit_scale)) and "logit_scale" in vocab[
        "logits_formula"]
    assert meta["architecture"]["kind"] == "open_vocabulary" and meta["class_names"] == loaded.class_names
    session = ort.InferenceSession(str(tmp_path / "onnx" / "student.onnx"), providers=["CPUExecutionProvider"])
    batch = x if meta["dynamic_batch"] else x[:1]
    got = torch.from_numpy(session.run(["logits"], {"image": batch.numpy()})[0])
    torch.testing.assert_close(got, want[: len(batch)], atol=1e-4, rtol=1e-4)

    weights = export_student(ckpt, "safetensors", tmp_path / "st")["student"]
    assert weights["loads_into_library"] is False and "vocabulary" in weights["keys"]
    state = load_file(tmp_path / "st" / "student.safetensors")
    assert state.keys() == loaded.model.state_dict().keys()


def test_export_options_are_checked_before_the_student_loads(tmp_path, monkeypatch, capsys):
    from pand.rules import validate_export_options

    monkeypatch.setattr("pand.export.load_student", lambda *a, **k: pytest.fail("loaded before checking options"))
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not read")
    names = tmp_path / "names.txt"
    names.write_text("heron\n\ngull\n")
    base = {"ckpt_path": str(ckpt), "format": "safetensors", "out": str(tmp_path / "out")}
    assert validate_export_options({**base, "class_names": str(names)}) == ["heron", "gull"]
    assert validate_export_options({**base, "class_names": "heron,gull"}) == ["heron", "gull"]
    assert validate_export_options(base) is None
    cases = {
        f"out={ckpt}": f"invalid option: out='{ckpt}' is a file; expected a folder (created if missing)",
        f"ckpt_path={tmp_path}": f"invalid option: ckpt_path='{tmp_path}' is a folder; expected a checkpoint file",
        "class_names=names.txt": "invalid option: class_names='names.txt': no such file; expected a text file with "
                                 "one class name per line",
        "class_names=[a,a]": "invalid option: class_names=['a', 'a']: class names must be distinct; repeated: 'a'",
        "format=ONNX": "invalid option: format='ONNX' is not allowed: expected one of 'onnx', 'torch_export', "
                       "'safetensors', 'open_clip', 'timm' (did you mean 'onnx'?)",
    }
    for option, message in cases.items():
        argv = [f"{k}={v}" for k, v in {**base, **dict([option.split("=", 1)])}.items()]
        assert main(["export", *argv]) == 2
        assert capsys.readouterr().err == f"pand export: error: {message}\n", option
    assert not (tmp_path / "out").exists()
