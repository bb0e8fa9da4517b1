"""The teacher cache of a run on image-caption pairs also holds the teacher's embeddings of every training caption:
built once, read back exactly as a live teacher would give them, and refused (with the reason) when made with another
teacher or another caption list, or damaged."""

import json

import pytest
import torch

from pand.cache.integrity import CacheDamagedError
from pand.cache.teacher import TeacherCache
from pand.config import compose, to_plain
from pand.distillers import get_distiller_class
from pand.engine.data import PandDataModule
from pand.engine.teacher_side import build_teacher_side, open_or_build_cache
from pand.errors import MismatchError
from pand.teachers.registry import load_teacher
from tests.data.test_captions import make_pairs
from tests.engine.conftest import tiny_overrides

OpenVocab = get_distiller_class("openvocab")


def _config(root, tmp_path, *extra):
    return to_plain(compose("train", [
        "data=captions", f"data.root={root}", "data.val_fraction=0.2", "data.image_size=32", "data.resize_size=36",
        "data.batch_size=4", "data.num_workers=0", "data.verify_images=false", "teacher=tiny",
        "student.pretrained=false", "trainer=cpu", f"run_dir={tmp_path / 'run'}", "method=openvocab",
        "method.caption_weight=1.0", f"cache.dir={tmp_path / 'cache'}", "cache.views=2", "cache.batch_size=4",
        "cache.num_workers=0", *extra]))


def test_the_cache_holds_the_caption_embeddings_and_serves_them_as_the_live_teacher_does(tmp_path, monkeypatch):
    root = make_pairs(tmp_path / "pairs")
    config = _config(root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    meta = json.loads((cache.folder / "meta.json").read_text())
    table = data.caption_table
    assert meta["captions"] == table.digest() and meta["num_captions"] == len(table.texts)
    assert "captions.safetensors" in meta["checksums"]
    live = load_teacher(config).caption_embeddings(list(table.texts)).half()
    assert torch.equal(cache.caption_embeds(), live)

    # a run from the cache never loads the teacher, and its distiller reads the same numbers
    monkeypatch.setattr("pand.engine.teacher_side.load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    data = PandDataModule(config["data"], seed=0)
    context, _ = build_teacher_side(config, data, OpenVocab)
    assert torch.equal(context.caption_embeds, live)
    assert data.teacher_cache is not None


def test_a_cache_made_with_other_captions_or_another_teacher_is_refused_with_the_reason(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    config = _config(root, tmp_path)
    open_or_build_cache(config, PandDataModule(config["data"], seed=0))
    path = root / "train.jsonl"
    # an unlabelled training image's caption changes: the caption list (and with it the dataset's content) differs
    data = PandDataModule(config["data"], seed=0)
    pool_caption = data.caption_table.texts[0]
    path.write_text(path.read_text().replace(pool_caption, "a different sentence"))
    with pytest.raises(MismatchError, match=r"(?s)refused:.*captions: stored '[0-9a-f]{64}', expected "
                                            r"'[0-9a-f]{64}'"):
        open_or_build_cache(config, PandDataModule(config["data"], seed=0))
    path.write_text(path.read_text().replace("a different sentence", pool_caption))
    other = _config(root, tmp_path, "teacher.pretrained=random:1")
    with pytest.raises(MismatchError, match=r"(?s)refused:.*teacher_spec"):
        open_or_build_cache(other, PandDataModule(other["data"], seed=0))
    # rebuilding replaces the caption embeddings too
    rebuilt = open_or_build_cache(_config(root, tmp_path, "teacher.pretrained=random:1", "cache.rebuild=true"),
                                  PandDataModule(other["data"], seed=0))
    fresh = load_teacher(other).caption_embeddings(list(PandDataModule(other["data"]).caption_table.texts)).half()
    assert torch.equal(rebuilt.caption_embeds(), fresh)


def test_a_damaged_or_missing_caption_file_is_named(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    config = _config(root, tmp_path)
    cache = open_or_build_cache(config, PandDataModule(config["data"], seed=0))
    path = cache.folder / "captions.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match="captions.safetensors does not match its checksum"):
        TeacherCache.open(cache.folder)
    path.unlink()
    with pytest.raises(CacheDamagedError, match="captions.safetensors is missing"):
        TeacherCache.open(cache.folder)


def test_a_classification_cache_records_no_captions(tmp_path, cub_root):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={tmp_path / 'c'}",
                                                      "cache.views=1", "cache.batch_size=4")))
    cache = open_or_build_cache(config, PandDataModule(config["data"], seed=0))
    assert "captions" not in cache.meta and not (cache.folder / "captions.safetensors").exists()
