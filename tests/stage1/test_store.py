"""Learned text-feature files record a digest of their tensor and refuse, by name, a file altered in place."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from pand.errors import PandError
from pand.provenance import save_tensors
from pand.stage1.store import load_text_features, read_record, save_text_features

TEACHER = {"model": "tiny", "pretrained": "random"}
CLASSES = ["cat", "dog", "owl"]


def flip_one_float(path, tensor: str, element: int = 1) -> None:
    """Negate one float32 of ``tensor`` inside a safetensors file, in place (same size, still a valid file)."""
    with open(path, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        start = json.loads(f.read(header_len))[tensor]["data_offsets"][0]
        f.seek(8 + header_len + start + 4 * element + 3)  # the byte holding the sign bit (little-endian)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x80]))


def test_text_features_record_their_digest_and_round_trip(tmp_path):
    path = tmp_path / "learned.safetensors"
    features = torch.randn(3, 8)
    save_text_features(path, features, {"teacher": TEACHER, "classes": CLASSES})
    assert set(read_record(path)["digests"]) == {"text_features"}
    assert torch.equal(load_text_features(path, TEACHER, CLASSES), features)


def test_a_float_flipped_in_place_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "learned.safetensors"
    save_text_features(path, torch.randn(3, 8), {"teacher": TEACHER, "classes": CLASSES})
    size = path.stat().st_size
    flip_one_float(path, "text_features")
    assert path.stat().st_size == size
    with pytest.raises(PandError) as err:
        load_text_features(path, TEACHER, CLASSES)
    assert str(err.value) == (
        f"{path} is damaged: its tensor 'text_features' does not match the digest in its record (the file was "
        "altered after it was written); learn the prompts again with `pand prompts ...`")


def test_a_file_written_before_digests_is_still_accepted(tmp_path):
    path = tmp_path / "old.safetensors"
    features = torch.randn(3, 8)
    save_tensors(path, {"text_features": features},
                 {"kind": "learned_text_features", "teacher": TEACHER, "classes": CLASSES})
    assert "digests" not in read_record(path)
    assert torch.equal(load_text_features(path, TEACHER, CLASSES), features)
