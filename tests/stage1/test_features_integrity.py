"""Stored teacher image features record a digest of their tensors; a file altered in place is refused by name, or
recomputed with rebuild=True; files written before digests existed are still read."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import pand.stage1.features as features_mod
from pand.data.base import ArrayDataset
from pand.errors import PandError
from pand.provenance import load_record, save_tensors
from pand.stage1.features import ensure_features, feature_record
from tests.stage1.test_store import flip_one_float


@pytest.fixture
def toy():
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    return ArrayDataset("toy", "train", ["a", "b"], images, [0, 1, 0, 1, 0, 1])


def _no_extraction(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the stored features should have been read, not recomputed")

    monkeypatch.setattr(features_mod, "extract_features", refuse)


def test_stored_features_record_digests_and_are_read_back(tiny_teacher, toy, tmp_path, monkeypatch):
    path = tmp_path / "train.safetensors"
    embeds, labels = ensure_features(path, tiny_teacher, toy, progress=False)
    assert set(load_record(path)["digests"]) == {"embeds", "labels"}
    _no_extraction(monkeypatch)
    again, again_labels = ensure_features(path, tiny_teacher, toy, progress=False)
    assert torch.equal(again, embeds) and torch.equal(again_labels, labels)


def test_a_float_flipped_in_place_is_refused_then_rebuilt_on_request(tiny_teacher, toy, tmp_path, caplog):
    path = tmp_path / "train.safetensors"
    embeds, _ = ensure_features(path, tiny_teacher, toy, progress=False)
    flip_one_float(path, "embeds", element=5)
    with pytest.raises(PandError) as err:
        ensure_features(path, tiny_teacher, toy, progress=False)
    assert str(err.value) == (
        f"{path} is damaged: its tensor 'embeds' does not match the digest in its record (the file was altered "
        "after it was written); pass features.rebuild=true to recompute it")

    caplog.set_level(logging.WARNING)
    rebuilt, _ = ensure_features(path, tiny_teacher, toy, progress=False, rebuild=True)
    assert f"rebuilding {path}: its tensors do not match the digests in its record" in caplog.text
    assert torch.allclose(rebuilt, embeds)
    ensure_features(path, tiny_teacher, toy, progress=False)  # the new file verifies


def test_a_file_written_before_digests_is_still_accepted(tiny_teacher, toy, tmp_path, monkeypatch):
    path = tmp_path / "train.safetensors"
    embeds = torch.nn.functional.normalize(torch.randn(len(toy), 8), dim=-1)
    labels = torch.tensor(toy.targets)
    save_tensors(path, {"embeds": embeds, "labels": labels}, feature_record(tiny_teacher, toy))
    _no_extraction(monkeypatch)
    got, got_labels = ensure_features(path, tiny_teacher, toy, progress=False)
    assert torch.equal(got, embeds) and torch.equal(got_labels, labels)
