"""Teacher kinds are registered like distillers and datasets: one module plus one config, and the engine reads only
what a kind declares (:mod:`pand.teachers.registry`)."""

import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import yaml

from pand.cli import main
from pand.config import compose, to_plain
from pand.config_catalogue import CONFIGS_DIR
from pand.engine.config_checks import validate_train_config
from pand.errors import ConfigError
from pand.teachers import IMAGE_EMBEDS, LOGITS, STAGE_FEATURES
from pand.teachers.classifier import ClassifierTeacher
from pand.teachers.registry import (
    _REGISTRY,
    TeacherKind,
    get_teacher_kind,
    kind_of,
    load_teacher,
    register_teacher_kind,
    teacher_kind_names,
)
from tests.engine.conftest import tiny_overrides


def test_the_shipped_kinds_and_their_configs_match():
    assert teacher_kind_names() == ["clip", "classifier", "ensemble"]
    kinds = set()
    for path in (CONFIGS_DIR / "teacher").glob("*.yaml"):
        config = yaml.safe_load(path.read_text()) or {}
        if "kind" in config:
            kinds.add(config["kind"])
            get_teacher_kind(config["kind"])  # every kind a config names is registered
    assert kinds == set(teacher_kind_names())  # and every registered kind has a config


@pytest.mark.parametrize("name", ["clip", "classifier", "ensemble"])
def test_a_kind_declares_consistent_outputs(name):
    kind = get_teacher_kind(name)
    assert kind.name == name
    assert kind.cached <= kind.provides and kind.served_from_cache <= kind.provides
    assert STAGE_FEATURES not in kind.cached  # too large per view: always from the live teacher
    assert kind.cached <= kind.served_from_cache


def test_the_shipped_declarations():
    clip, classifier = get_teacher_kind("clip"), get_teacher_kind("classifier")
    assert clip.has_text and not classifier.has_text
    assert clip.cached == {IMAGE_EMBEDS} and clip.served_from_cache == {IMAGE_EMBEDS, LOGITS}
    assert classifier.provides == {LOGITS, STAGE_FEATURES} and classifier.cached == {LOGITS}


def test_an_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="teacher.kind='vlm' is not allowed: expected one of 'clip', 'classifier'"):
        kind_of({"teacher": {"kind": "vlm"}})
    assert kind_of({"teacher": {}}).name == "clip"  # the default


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_teacher_kind("clip")(type("Again", (TeacherKind,), {}))


def test_the_classifier_kind_refuses_its_weights_given_twice_or_not_at_all():
    kind = get_teacher_kind("classifier")
    assert kind.setting_errors({"pretrained": "random"}) == []
    for settings, got in (({}, "none"), ({"ckpt": "a.ckpt", "weights": "b.pth"}, "['ckpt', 'weights']")):
        (error,) = kind.setting_errors(settings)
        assert "exactly one of teacher.ckpt" in error and f"got {got}" in error


@pytest.fixture
def logits_only_kind():
    """A kind a contributor might add: a frozen classifier under another name, declared in one class."""

    @register_teacher_kind("frozen_linear")
    class FrozenLinear(TeacherKind):
        provides = frozenset({LOGITS})
        cached = frozenset({LOGITS})
        served_from_cache = frozenset({LOGITS})

        def load(self, teacher: Mapping[str, Any], *, data, classes, device):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(len(classes)))
            model(torch.zeros(1, 3, 8, 8))
            return ClassifierTeacher(model, num_classes=len(classes), image_size=8, mean=data["mean"],
                                     std=data["std"], identity={"kind": self.name})

        def spec(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
            return {"kind": self.name}

    yield FrozenLinear
    del _REGISTRY["frozen_linear"]


def test_a_new_kind_is_checked_and_loaded_from_its_declarations_alone(logits_only_kind, cub_root, tmp_path):
    overrides = tiny_overrides(cub_root, tmp_path / "run", "teacher.kind=frozen_linear")
    # vl2lite reads image embeddings, which the new kind does not declare: refused before anything loads
    with pytest.raises(ConfigError, match=r"reads \['image_embeds'\], which a frozen_linear teacher does not provide "
                                          r"\(it provides \['logits'\]\)"):
        validate_train_config(to_plain(compose("train", overrides)))
    config = to_plain(compose("train", [*overrides, "method=kd"]))
    validate_train_config(config)
    teacher = load_teacher(config, classes=["a", "b", "c"])
    assert teacher.outputs(torch.zeros(2, 3, 8, 8), {LOGITS})[LOGITS].shape == (2, 3)
    # and the engine trains from it, live and from its teacher cache, with no change anywhere else
    assert main(["train", *overrides, "method=kd", "trainer.max_epochs=1", "test=false"]) == 0
    cached = tiny_overrides(cub_root, tmp_path / "cached", "teacher.kind=frozen_linear", "method=kd",
                            "trainer.max_epochs=1", "test=false", f"cache.dir={tmp_path / 'cache'}", "cache.views=2")
    assert main(["train", *cached]) == 0
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["teacher_spec"] == {"kind": "frozen_linear"}


def test_a_method_needing_a_text_tower_refuses_a_kind_without_one(cub_root, tmp_path):
    overrides = tiny_overrides(cub_root, tmp_path / "run", "teacher=classifier", "teacher.pretrained=random",
                               "method=openvocab")
    with pytest.raises(ConfigError) as refused:
        validate_train_config(to_plain(compose("train", overrides)))
    assert "a classifier teacher has no text tower (use teacher.kind=clip)" in str(refused.value)
