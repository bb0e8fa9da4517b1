"""Local weights files (timm's loader, never unpickling) and pretrained weights on machines without network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision

from pand.errors import ConfigError, WeightsUnavailableError
from pand.networks import load_weights_file
from pand.students import build_student


def _mark(path):
    Path(path).write_text("unpickled")


class _Payload:
    """Unpickling this would write a marker file: the stand-in for code run by a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _mark, (self.marker,)


def test_wrapped_checkpoint_with_module_prefixes_is_loaded(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "ddp.pth.tar"
    ddp = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": ddp, "epoch": 90, "arch": "resnet18"}, path)
    student = build_student("resnet18", 5, source="torchvision", weights=str(path))
    torch.testing.assert_close(student.backbone.conv1.weight, reference.conv1.weight)
    # the same through timm, from safetensors with torch.compile's prefix, and from a tutorial-style checkpoint
    timm_ref = build_student("resnet18", 5, source="timm", pretrained=False).backbone
    from safetensors.torch import save_file

    st = tmp_path / "compiled.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in timm_ref.state_dict().items()}, str(st))
    student = build_student("resnet18", 5, source="timm", weights=str(st))
    torch.testing.assert_close(student.backbone.conv1.weight, timm_ref.conv1.weight)
    tutorial = tmp_path / "tutorial.pt"
    torch.save({"epoch": 3, "model_state_dict": ddp, "optimizer_state_dict": {}}, tutorial)
    assert set(load_weights_file(tutorial)) == set(reference.state_dict())


def test_pickled_objects_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "hook": _Payload(marker)}, path)
    with pytest.raises(WeightsUnavailableError) as e:
        build_student("resnet18", 5, source="torchvision", weights=str(path))
    msg = str(e.value)
    assert str(path) in msg and "pickled Python objects" in msg and "_mark" in msg
    assert not marker.exists()


def test_unreadable_and_missing_files_are_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="missing.pth does not exist"):
        load_weights_file(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(WeightsUnavailableError, match="notes.pth as a plain state dict: .*not a file written by torch"):
        load_weights_file(text)
    unknown = tmp_path / "unknown.pth"
    torch.save({"epoch": 1, "net": {"w": torch.zeros(1)}}, unknown)
    with pytest.raises(WeightsUnavailableError, match="'epoch', 'net' are not tensors"):
        load_weights_file(unknown)


def test_key_mismatch_names_the_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "mismatch.pth"
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match=r"missing \['layer1.0.conv1.weight'\].*\['extra.weight'\]"):
        build_student("resnet18", 5, source="torchvision", weights=str(path))


@pytest.fixture
def offline_empty_caches(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1, empty Hugging Face and torch hub caches, and no network: a connection fails the test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


def test_offline_uncached_timm_weights_fail_at_once(offline_empty_caches):
    with pytest.raises(WeightsUnavailableError) as e:
        build_student("resnet18", 5, source="timm", pretrained=True)
    msg = str(e.value)
    assert "resnet18.a1_in1k" in msg and str(offline_empty_caches / "hf" / "hub") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "student.weights=" in msg and "student.pretrained=false" in msg


def test_offline_uncached_torchvision_weights_fail_at_once(offline_empty_caches):
    with pytest.raises(WeightsUnavailableError) as e:
        build_student("resnet18", 5, source="torchvision", pretrained=True)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(offline_empty_caches / "torch" / "hub" / "checkpoints") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "student.weights=" in msg


@pytest.mark.parametrize(("pretrained", "file"), [(True, "mobilenet_v2-7ebf99e0.pth"),
                                                 ("IMAGENET1K_V1", "mobilenet_v2-b0353104.pth")])
def test_torchvision_weights_can_be_named(offline_empty_caches, pretrained, file):
    # true is torchvision's DEFAULT (IMAGENET1K_V2 for MobileNetV2); a name picks other weights, e.g. the V1 ones
    # that pretrained=True meant in the torchvision the VL2Lite and PAND authors used
    with pytest.raises(WeightsUnavailableError, match=file):
        build_student("mobilenet_v2", 5, source="torchvision", pretrained=pretrained)


def test_an_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="not a weights name of torchvision 'mobilenet_v2'; it has IMAGENET1K_V1, "
                                          "IMAGENET1K_V2"):
        build_student("mobilenet_v2", 5, source="torchvision", pretrained="IMAGENET1K_V3")
    with pytest.raises(ConfigError, match="names torchvision weights, but 'resnet18' is a timm model"):
        build_student("resnet18", 5, source="timm", pretrained="IMAGENET1K_V1")


def test_network_failure_suggests_offline_mode(monkeypatch):
    from huggingface_hub import constants

    from pand.networks import timm_models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(name, download, image_size, kwargs):
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as err:
            raise FileNotFoundError("cannot find the requested files in the local cache") from err

    monkeypatch.setattr(timm_models, "create_timm", unreachable)
    with pytest.raises(WeightsUnavailableError) as e:
        build_student("resnet18", 5, source="timm", pretrained=True)
    msg = str(e.value)
    assert "resnet18" in msg and "Name or service not known" in msg
    assert "set HF_HUB_OFFLINE=1" in msg and "student.weights=" in msg


def test_shape_mismatch_names_the_key(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "narrow.pth"
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match="does not fit torchvision resnet18.*conv1.weight"):
        build_student("resnet18", 5, source="torchvision", weights=str(path))
