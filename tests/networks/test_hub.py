"""pand.networks.hub: offline detection, cache look-ups and network-error classification, all without network."""

from __future__ import annotations

import socket
import urllib.error

import pytest

from pand.errors import WeightsUnavailableError
from pand.networks import hub
from pand.teachers.clip import _refuse_uncached_offline


def _cache_file(cache, repo, filename, commit="a" * 40):
    """A file in Hugging Face's cache layout, as hf_hub_download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_offline_mode_follows_the_environment(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_offline() is offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub read it at import: offline too
    assert hub.hub_offline()


def test_cached_tag_passes_the_offline_check(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    _cache_file(tmp_path, repo, "README.md")
    with pytest.raises(WeightsUnavailableError, match="open_clip_model.safetensors, open_clip_pytorch_model.bin"):
        _refuse_uncached_offline("ViT-B-32", "laion2b_s34b_b79k", None)
    found = _cache_file(tmp_path, repo, "open_clip_pytorch_model.bin")
    _refuse_uncached_offline("ViT-B-32", "laion2b_s34b_b79k", None)  # cached: open_clip may load it
    assert hub.hf_cached(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]) == str(found)
    # an explicit cache_dir is where the weights are looked for
    with pytest.raises(WeightsUnavailableError, match=str(tmp_path / "other")):
        _refuse_uncached_offline("ViT-B-32", "laion2b_s34b_b79k", str(tmp_path / "other"))


def test_network_errors_are_told_from_others():
    def chained(outer, inner):
        try:
            raise inner
        except BaseException as err:
            try:
                raise outer from err
            except BaseException as final:
                return final

    assert hub.is_network_error(chained(RuntimeError("download failed"), socket.gaierror(-2, "Name not known")))
    assert hub.is_network_error(urllib.error.URLError(ConnectionRefusedError()))
    assert hub.is_network_error(chained(FileNotFoundError("x"), TimeoutError("timed out")))
    assert not hub.is_network_error(urllib.error.HTTPError("https://x", 404, "Not Found", {}, None))
    assert not hub.is_network_error(chained(RuntimeError("size mismatch"), ValueError("bad shape")))
    assert hub.root_reason(chained(RuntimeError("wrapper"), socket.gaierror(-2, "Name not known"))).startswith(
        "gaierror")
