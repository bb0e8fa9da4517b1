"""The teacher cache of a classifier teacher: per-view logits (float16, or top-k with the left-over mass kept), the
same replay, integrity and refusals as a CLIP cache, and logit methods trained from it without loading the teacher."""

import json

import numpy as np
import pytest
import torch

from pand.cache.integrity import CacheDamagedError
from pand.cache.teacher import (
    CachedTeacherSource,
    TeacherCache,
    decode_topk,
    encode_topk,
)
from pand.cache.teacher.layout import SHARDS, finished_rows
from pand.cli import main
from pand.config import compose, to_plain
from pand.distillers import Progress, get_distiller_class
from pand.engine.data import PandDataModule
from pand.engine.run import build_training
from pand.engine.teacher_side import (
    build_teacher_side,
    open_or_build_cache,
)
from pand.errors import ConfigError, MismatchError, PandError
from pand.teachers import LOGITS, LiveTeacherSource
from pand.teachers.classifier import create_classifier
from pand.teachers.registry import load_teacher
from tests.engine.conftest import tiny_overrides

CLASSIFIER = ("teacher=classifier", "teacher.model=test_resnet", "teacher.source=timm", "student=timm",
              "student.name=test_resnet")


def _overrides(cub_root, tmp_path, *extra, run="run"):
    return tiny_overrides(cub_root, tmp_path / run, *CLASSIFIER, "teacher.pretrained=random", "method=kd",
                          f"cache.dir={tmp_path / 'cache'}", "cache.views=2", "cache.batch_size=4", "cache.shard_size=4", *extra)


def _config(cub_root, tmp_path, *extra):
    return to_plain(compose("train", _overrides(cub_root, tmp_path, *extra)))


def _live(config, data):
    teacher = load_teacher(config, classes=data.classes)
    return LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])


def _batch(data):
    data.setup()
    return next(iter(data.train_dataloader()))


# -- what is stored ------------------------------------------------------------------------------------------------
def test_cached_logits_equal_the_live_teachers_on_the_replayed_view(cub_root, tmp_path):
    config = _config(cub_root, tmp_path)
    data, module = build_training(config)
    cache = data.teacher_cache
    assert isinstance(module.teacher_source, CachedTeacherSource)
    assert module.teacher_source.provides == frozenset({LOGITS}) and module.distiller.context.num_classes == 3
    n = len(data.splits["train"])
    logits = cache.array("logits")
    assert logits.shape == (n, 2, 3) and logits.dtype == np.float16
    assert cache.array("digests").shape == (n, 2, 16)
    assert not (cache.folder / "text.safetensors").exists()  # class text is CLIP's alone
    meta = json.loads((cache.folder / "meta.json").read_text())
    live = _live(config, data)
    assert meta["outputs"] == ["logits"] and meta["logits_topk"] is None and meta["complete"]
    assert meta["teacher"] == live.teacher.identity and meta["teacher"]["weights"]
    assert meta["classes"] == data.classes and meta["teacher_spec"]["kind"] == "classifier"
    assert module.distiller.context.identity == live.teacher.identity

    batch = _batch(data)
    assert "view" in batch
    cached, online = module.teacher_source(batch, {LOGITS}), live(batch, {LOGITS})
    assert cached[LOGITS].dtype == torch.float32 and cached[LOGITS].shape == (batch["image"].shape[0], 3)
    torch.testing.assert_close(cached[LOGITS], online[LOGITS], rtol=1e-3, atol=1e-3)  # float16 storage
    distiller = module.distiller.eval()
    with torch.no_grad():
        a = distiller.training_losses(batch, cached, Progress(1, 10)).losses
        b = distiller.training_losses(batch, online, Progress(1, 10)).losses
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=2e-3, abs=1e-4), key


def test_topk_reconstruction_keeps_the_top_k_and_the_left_over_mass():
    torch.manual_seed(0)
    z = torch.randn(64, 100) * 3
    for k in (1, 5, 20, 99):
        values, index = encode_topk(z, k)
        assert values.shape == (64, k + 1) and index.shape == (64, k)
        rebuilt = decode_topk(values, index, 100)
        top = z.topk(k, dim=-1)
        torch.testing.assert_close(rebuilt.gather(-1, top.indices), top.values, rtol=0, atol=0)
        p, q = z.softmax(-1), rebuilt.softmax(-1)
        torch.testing.assert_close(q.gather(-1, top.indices), p.gather(-1, top.indices), rtol=1e-5, atol=1e-7)
        rest = torch.ones_like(z, dtype=torch.bool).scatter(-1, top.indices, False)
        left = (p * rest).sum(-1)
        # every class not kept gets the same share of exactly the left-over mass
        torch.testing.assert_close(q[rest].view(64, 100 - k), (left / (100 - k)).unsqueeze(-1).expand(64, 100 - k),
                                   rtol=1e-4, atol=1e-8)
        assert (rebuilt[rest].view(64, -1) <= top.values[:, -1:]).all()
    with pytest.raises(ValueError, match="0 < k < 100"):
        encode_topk(z, 100)


def test_topk_cache_stores_indices_and_the_floor(cub_root, tmp_path):
    config = _config(cub_root, tmp_path, "cache.topk=1")
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    n = len(data.splits["train"])
    values, index = cache.array("logits_topk"), cache.array("logits_index")
    assert values.shape == (n, 2, 2) and values.dtype == np.float16
    assert index.shape == (n, 2, 1) and index.dtype == np.int16
    assert cache.array("digests").shape == (n, 3, 16)
    assert not (cache.folder / SHARDS / "00000" / "logits.npy").exists()
    source = CachedTeacherSource(cache)
    batch = _batch(PandDataModule(config["data"], seed=0, teacher_cache=cache))
    cached, online = source(batch, {LOGITS})[LOGITS], _live(config, data)(batch, {LOGITS})[LOGITS]
    top = online.max(-1)
    torch.testing.assert_close(cached.max(-1).values, top.values, rtol=1e-3, atol=1e-3)
    assert torch.equal(cached.argmax(-1), top.indices)
    p, q = online.softmax(-1), cached.softmax(-1)
    torch.testing.assert_close(q.max(-1).values, p.max(-1).values, rtol=1e-3, atol=1e-3)
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top.indices[:, None], False)
    torch.testing.assert_close(q[rest].view(-1, 2), (p * rest).sum(-1, keepdim=True).expand(-1, 2) / 2,
                               rtol=1e-3, atol=1e-3)
    TeacherCache.open(cache.folder, verify="full")

    with pytest.raises(MismatchError, match="logits_topk: stored 1, expected None"):
        open_or_build_cache(_config(cub_root, tmp_path), data)
    with pytest.raises(ConfigError, match="cache.topk=3 is not allowed with 3 classes"):
        open_or_build_cache(_config(cub_root, tmp_path, "cache.topk=3"), data)


# -- refusals ------------------------------------------------------------------------------------------------------
def test_cache_of_another_teacher_is_refused_with_the_reason(cub_root, tmp_path):
    config = _config(cub_root, tmp_path, "teacher.pretrained=random:0")
    data = PandDataModule(config["data"], seed=0)
    built = open_or_build_cache(config, data)
    other = _config(cub_root, tmp_path, "teacher.pretrained=random:1")
    assert load_teacher(other, classes=data.classes).identity["weights"] != built.meta["teacher"]["weights"]
    with pytest.raises(MismatchError, match=r"teacher_spec: stored .*'random:0'.*expected .*'random:1'"):
        open_or_build_cache(other, data)
    # a CLIP teacher's run is refused too: another teacher, other outputs
    clip = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "clip", f"cache.dir={tmp_path / 'cache'}",
                                                    "cache.views=2")))
    with pytest.raises(MismatchError) as err:
        open_or_build_cache(clip, PandDataModule(clip["data"], seed=0))
    assert "teacher_spec" in str(err.value) and "outputs[0]: stored 'logits', expected 'image_embeds'" in str(err.value)
    cache = open_or_build_cache(_config(cub_root, tmp_path, "teacher.pretrained=random:1", "cache.rebuild=true"), data)
    assert cache.meta["teacher"]["weights"] != built.meta["teacher"]["weights"]


def test_weights_file_rewritten_in_place_is_refused(cub_root, tmp_path):
    path = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(create_classifier("test_resnet", "timm", 3).state_dict(), path)
    config = _config(cub_root, tmp_path, "teacher.pretrained=null", f"teacher.weights={path}")
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    assert cache.meta["teacher_spec"]["weights"] == str(path.resolve())
    assert cache.meta["teacher"]["source"] == f"file:{path.resolve()}"
    open_or_build_cache(config, data)  # the same file: kept
    torch.manual_seed(1)
    torch.save(create_classifier("test_resnet", "timm", 3).state_dict(), path)  # e.g. best.ckpt of a run going on
    with pytest.raises(MismatchError, match="teacher_spec: stored .*'file_digest'"):
        open_or_build_cache(config, data)


def test_old_format_cache_is_refused_and_says_to_rebuild(cub_root, tmp_path):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    meta = json.loads((cache.folder / "meta.json").read_text())
    meta["version"] = 2
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError) as err:
        TeacherCache.open(cache.folder)
    assert "version: stored 2, expected 4" in str(err.value) and "cache.rebuild=true" in str(err.value)
    assert "pand cache build" in str(err.value)
    with pytest.raises(MismatchError, match="version: stored 2, expected 4"):
        open_or_build_cache(config, data)
    assert open_or_build_cache(_config(cub_root, tmp_path, "cache.rebuild=true"), data).meta["version"] == 4


@pytest.mark.parametrize("teacher", ["classifier", "clip"])
def test_a_method_reading_more_than_the_cache_holds_is_refused_before_any_cache(cub_root, tmp_path, teacher):
    extra = ("method=nrkd",)
    if teacher == "clip":
        config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", *extra,
                                                          f"cache.dir={tmp_path / 'cache'}", "cache.views=2")))
    else:
        config = _config(cub_root, tmp_path, *extra)
    data = PandDataModule(config["data"], seed=0)
    with pytest.raises(ConfigError) as err:
        build_teacher_side(config, data, get_distiller_class("nrkd"))
    message = str(err.value)
    assert "method 'nrkd' reads the teacher's stage features" in message and "needs the live teacher" in message
    assert "remove cache.dir" in message
    assert not (tmp_path / "cache").exists() and data.teacher_cache is None


# -- integrity -----------------------------------------------------------------------------------------------------
def _flip_byte(path, row):
    m = np.load(path, mmap_mode="r")
    offset = m.offset + row * m[0].nbytes + 1
    del m
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(("topk", "name"), [(None, "logits"), (2, "logits_topk"), (2, "logits_index")])
def test_damaged_logit_arrays_are_refused_and_rebuilt(cub_root, tmp_path, topk, name):
    extra = () if topk is None else (f"cache.topk={topk}",)
    config = _config(cub_root, tmp_path, *extra)
    data = PandDataModule(config["data"], seed=0)
    cache = open_or_build_cache(config, data)
    first = cache.array(name)
    path, shown = cache.folder / SHARDS / "00001" / f"{name}.npy", f"shards/00001/{name}.npy"
    _flip_byte(path, 1)
    with pytest.raises(CacheDamagedError, match=rf"{shown} row 1 \(image 5\) does not match its checksum"):
        TeacherCache.open(cache.folder)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CacheDamagedError, match=rf"{shown} is .* bytes, expected .*: truncated"):
        open_or_build_cache(config, data)
    rebuilt = open_or_build_cache(_config(cub_root, tmp_path, *extra, "cache.rebuild=true"), data)
    np.testing.assert_array_equal(rebuilt.array(name), first)


def test_interrupted_classifier_build_resumes(cub_root, tmp_path, monkeypatch):
    config = _config(cub_root, tmp_path)
    data = PandDataModule(config["data"], seed=0)
    original = LiveTeacherSource.forward
    calls = {"n": 0}

    def dies(self, batch, keys):
        calls["n"] += 1
        if calls["n"] > 2:  # the 2 views of the first chunk, then "killed"
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(LiveTeacherSource, "forward", dies)
    with pytest.raises(KeyboardInterrupt):
        open_or_build_cache(config, data)
    monkeypatch.setattr(LiveTeacherSource, "forward", original)
    with pytest.raises(PandError, match="incomplete"):
        TeacherCache.open(tmp_path / "cache")
    assert finished_rows(tmp_path / "cache") == 4
    # finished before the interruption, altered since: found by the resumed build and built again
    _flip_byte(tmp_path / "cache" / SHARDS / "00000" / "logits.npy", 0)
    cache = open_or_build_cache(config, data)
    fresh_config = _config(cub_root, tmp_path / "fresh")
    fresh = open_or_build_cache(fresh_config, PandDataModule(fresh_config["data"], seed=0))
    for path in sorted((fresh.folder / SHARDS).rglob("*.npy")):  # byte for byte, whatever was resumed
        assert (cache.folder / path.relative_to(fresh.folder)).read_bytes() == path.read_bytes(), path


# -- training ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_training_from_a_classifier_cache_never_loads_the_teacher(cub_root, tmp_path, monkeypatch, method):
    overrides = [o for o in _overrides(cub_root, tmp_path, "trainer.max_epochs=1", run="first")
                 if not o.startswith("method=")] + [f"method={method}"]
    if method == "kd":
        assert main(["cache", "build", *overrides]) == 0
    else:
        assert main(["train", *overrides]) == 0  # the run builds the missing cache first
    assert TeacherCache.open(tmp_path / "cache").meta["outputs"] == ["logits"]

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache covers the run")

    monkeypatch.setattr("pand.teachers.classifier.load_classifier_teacher", refuse)
    run = tmp_path / "second"
    second = [o.replace(str(tmp_path / "first"), str(run)) for o in overrides]
    assert main(["train", *second]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["test_acc1"] is not None
    assert ("train/kd" if method == "kd" else "train/nckd") in (run / "metrics.csv").read_text()


def test_topk_is_refused_for_a_clip_teachers_cache(cub_root, tmp_path, capsys):
    overrides = tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={tmp_path / 'cache'}", "cache.views=2",
                               "cache.topk=5")
    assert main(["train", *overrides]) == 2
    assert "cache.topk=5 is set, but a clip teacher's cache stores image_embeds, not logits" in capsys.readouterr().err


def test_bf16_logit_cache_is_probed_on_its_logits_and_agrees_with_fp32(cub_root, tmp_path):
    config = _config(cub_root, tmp_path / "fp32")
    data = PandDataModule(config["data"], seed=0)
    reference = open_or_build_cache(config, data)
    low = open_or_build_cache(_config(cub_root, tmp_path / "bf16", "cache.precision=bf16"), data)
    stats = low.meta["agreement"]
    assert low.meta["precision"] == "bf16" and "precision" not in reference.meta
    assert stats["rows"] == 4 and 0 < stats["max_rel_error"] <= 0.02
    a = reference.array("logits").astype(np.float32)
    b = low.array("logits").astype(np.float32)
    rel = np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)
    assert 0 < rel.max() <= 0.02
    with pytest.raises(PandError, match="max relative L2 error .* > tolerance cache.precision_tolerance=1e-09"):
        open_or_build_cache(_config(cub_root, tmp_path / "strict", "cache.precision=fp16",
                                    "cache.precision_tolerance=1e-9"), data)
    assert not (tmp_path / "strict" / "cache" / "meta.json").exists()
