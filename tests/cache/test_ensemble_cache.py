"""A teacher ensemble's cache stores its members' logits side by side; read back, they equal the live members' on the
replayed view (to float16), and their average equals the live ensemble's."""

import json

import numpy as np
import pytest
import torch

from pand.cache.teacher import CachedTeacherSource
from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.run import build_training
from pand.errors import MismatchError
from pand.teachers import LOGITS, MEMBER_LOGITS, LiveTeacherSource
from pand.teachers.ensemble import MemberAverage, average_log_probs
from pand.teachers.registry import load_teacher
from tests.engine.conftest import tiny_overrides

# a CLIP teacher (zero-shot over the run's classes) beside a classifier teacher
MEMBERS = "teacher.members=[tiny,{kind: classifier, model: test_resnet, pretrained: 'random:1'}]"


def _overrides(cub_root, tmp_path, *extra):
    return tiny_overrides(cub_root, tmp_path / "run", "teacher=ensemble", MEMBERS, "teacher.member_weights=[3,1]",
                          "method=kd", "method.members=each", "student=timm", "student.name=test_resnet",
                          f"cache.dir={tmp_path / 'cache'}", "cache.views=2", "cache.shard_size=8", *extra)


def test_the_cache_holds_each_members_logits_and_serves_their_average(cub_root, tmp_path):
    config = to_plain(compose("train", _overrides(cub_root, tmp_path)))
    data, module = build_training(config)
    cache = data.teacher_cache
    n = len(data.splits["train"])
    assert cache.meta["outputs"] == [MEMBER_LOGITS] and cache.meta["num_members"] == 2
    assert cache.array("member_logits").shape == (n, 2, 2 * 3)  # K=2 views, 2 members x 3 classes side by side
    assert cache.meta["templates"] == config["data"]["templates"]  # its CLIP member reads them
    source = module.teacher_source
    assert isinstance(source, MemberAverage) and isinstance(source.inner, CachedTeacherSource)

    data.setup()
    batch = next(iter(data.train_dataloader()))
    cached = source(batch, {LOGITS, MEMBER_LOGITS})
    live = LiveTeacherSource(load_teacher(config, classes=data.classes), config["data"]["mean"],
                             config["data"]["std"])(batch, {LOGITS, MEMBER_LOGITS})
    torch.testing.assert_close(cached[MEMBER_LOGITS], live[MEMBER_LOGITS], atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(cached[LOGITS], average_log_probs(cached[MEMBER_LOGITS], [0.75, 0.25]))
    torch.testing.assert_close(cached[LOGITS], live[LOGITS], atol=1e-2, rtol=1e-3)


def test_a_run_trains_from_the_ensembles_cache_without_loading_a_member(cub_root, tmp_path, monkeypatch):
    overrides = _overrides(cub_root, tmp_path, "trainer.max_epochs=1", "test=false")
    assert main(["cache", "build", *overrides]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("a member was loaded although the cache covers the run")

    monkeypatch.setattr("pand.teachers.ensemble.load_ensemble_teacher", refuse)
    assert main(["train", *overrides]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher"] == "ensemble" and np.isfinite(summary["val_acc1"])


def test_a_cache_of_other_members_or_templates_is_refused(cub_root, tmp_path):
    config = to_plain(compose("train", _overrides(cub_root, tmp_path)))
    build_training(config)
    other = _overrides(cub_root, tmp_path, "teacher.members=[tiny,{kind: classifier, model: test_resnet, "
                                           "pretrained: 'random:2'}]")
    with pytest.raises(MismatchError, match="teacher_spec"):
        build_training(to_plain(compose("train", other)))
    with pytest.raises(MismatchError, match="templates"):
        build_training(to_plain(compose("train", _overrides(cub_root, tmp_path, "data.templates=['a {}']"))))
    assert build_training(config)[0].teacher_cache.meta["complete"]  # the original cache still opens
