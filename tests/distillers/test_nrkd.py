"""NRKD: the feature term pairs the deepest usable stages and needs the live teacher; without it the method reads
logits only (and may use a teacher cache)."""

import pytest
import timm
import torch

from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config
from pand.distillers import Progress, TeacherContext, build_distiller, get_distiller_class
from pand.engine.teacher_side import add_stages
from pand.errors import ConfigError
from pand.losses import kd_loss, nlrd_loss, nrkd_feature_loss
from pand.students import build_student
from pand.teachers import LOGITS, STAGE_FEATURES, LiveTeacherSource
from pand.teachers.classifier import ClassifierTeacher

C = 5
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def _setup(**options):
    torch.manual_seed(0)
    teacher = ClassifierTeacher(timm.create_model("test_resnet", num_classes=C), num_classes=C, image_size=None,
                                mean=MEAN, std=STD, identity={"kind": "classifier", "model": "test_resnet"})
    source = LiveTeacherSource(teacher, MEAN, STD)
    context = TeacherContext(identity=teacher.identity, num_classes=C)
    add_stages(context, source, 32, with_model=False)
    student = build_student("resnet8", C, source="cifar", pretrained=False, image_size=32)
    return build_distiller({"name": "nrkd", **options}, student, C, context), source, context


def test_requires_follow_the_feature_weight():
    cls = get_distiller_class("nrkd")
    assert cls.requires_for({}) == {LOGITS, STAGE_FEATURES}
    assert cls.requires_for({"feature_weight": 0.0}) == {LOGITS}
    assert _setup(feature_weight=0.0)[0].requires == {LOGITS}


def test_stages_with_one_position_are_skipped_and_the_deepest_pair():
    nrkd, _, context = _setup()
    # test_resnet at 32 px: act1 16x16, layer1 8x8, layer2 4x4, layer3 2x2, layer4 1x1 (skipped); resnet8: 32, 16, 8
    usable_teacher = [i for i, s in enumerate(context.stage_shapes) if s[1] * s[2] > 1]
    assert nrkd.teacher_stage_index == usable_teacher[-3:]
    assert nrkd.stage_names == ["backbone.stage1", "backbone.stage2", "backbone.stage3"]


def test_losses_are_the_sum_of_the_public_terms():
    nrkd, source, _ = _setup(k=2, feature_weight=0.5, temperature=3.0)
    batch = {"image": torch.randn(6, 3, 32, 32), "label": torch.arange(6) % C}
    teacher = source(batch, nrkd.requires)
    out = nrkd.training_losses(batch, teacher, Progress(0, 1))
    logits = out.logits
    torch.testing.assert_close(out.losses["kd"], kd_loss(logits, teacher[LOGITS], 3.0))
    torch.testing.assert_close(out.losses["nlrd"], nlrd_loss(logits, teacher[LOGITS], 2))
    feats = [teacher[STAGE_FEATURES][i] for i in nrkd.teacher_stage_index]
    with torch.no_grad():
        nrkd._tap.enabled = True
        nrkd.student(batch["image"])
        s_feats = nrkd._tap.take()
        nrkd._tap.enabled = False
    expected = 0.5 * sum(nrkd_feature_loss(s, t) for s, t in zip(s_feats, feats))
    torch.testing.assert_close(out.losses["nrkd_feat"], expected)


@pytest.mark.parametrize(("method", "message"), [
    (["method=nrkd"], "stage features"),
    (["method=pat"], "trains modules inside the teacher"),
])
def test_a_cache_is_refused_for_what_only_a_live_teacher_gives(method, message):
    config = to_plain(compose("train", ["data=cifar100", "teacher=classifier", "teacher.pretrained=random",
                                        "student=cifar", "cache.dir=/tmp/c", "cache.views=2", *method]))
    with pytest.raises(ConfigError, match=message):
        validate_train_config(config)


def test_response_only_nrkd_may_use_a_cache():
    config = to_plain(compose("train", ["data=cifar100", "teacher=classifier", "teacher.pretrained=random",
                                        "student=cifar", "cache.dir=/tmp/c", "cache.views=2", "method=nrkd",
                                        "method.feature_weight=0"]))
    validate_train_config(config)
