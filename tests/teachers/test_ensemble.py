"""Teacher ensembles (``teacher=ensemble``): the members' averaged class distribution as ``logits``, each member's own
logits as ``member_logits``, members filled in from their kind's config, and clear refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from pand.cli import main
from pand.config import compose, group_option, to_plain
from pand.config_catalogue import config_groups
from pand.engine.config_checks import validate_train_config
from pand.errors import ConfigError, WeightsUnavailableError
from pand.teachers import LOGITS, MEMBER_LOGITS, LiveTeacherSource, ZeroShotLogits
from pand.teachers.classifier import create_classifier
from pand.teachers.ensemble import EnsembleMember, EnsembleTeacher, average_log_probs, members_of
from pand.teachers.precision import AgreementProbe, teacher_autocast
from pand.teachers.registry import get_teacher_kind
from tests.engine.conftest import tiny_overrides

DATA = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "templates": ["a photo of a {}."]}
CLASSES = ["a", "b", "c"]
ENSEMBLE = get_teacher_kind("ensemble")
# Two tiny classifiers with random weights; the second expects another input size and normalisation than the data's.
FIRST = {"kind": "classifier", "model": "test_resnet", "pretrained": "random:1"}
SECOND = {"kind": "classifier", "model": "test_resnet", "pretrained": "random:2", "image_size": 40,
          "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.3, 0.25]}


def _alone(member: dict):
    """A member loaded as ``teacher=<its kind>`` loads it, with the source a run gives it alone."""
    kind, settings = members_of({"members": [member]})[0][0]
    teacher = kind.load(settings, data=DATA, classes=CLASSES, device="cpu")
    return teacher, LiveTeacherSource(teacher, DATA["mean"], DATA["std"])


def _ensemble(*members, **settings) -> LiveTeacherSource:
    teacher = ENSEMBLE.load({"kind": "ensemble", "members": list(members), **settings}, data=DATA, classes=CLASSES,
                            device="cpu")
    return LiveTeacherSource(teacher, DATA["mean"], DATA["std"])


def test_what_the_kind_declares():
    assert ENSEMBLE.provides == {LOGITS, MEMBER_LOGITS} and not ENSEMBLE.has_text
    # A cache of logits alone would keep only the average: it stores the members' logits side by side and serves both.
    assert ENSEMBLE.cached == {MEMBER_LOGITS} and ENSEMBLE.served_from_cache == {LOGITS, MEMBER_LOGITS}
    # every kind has the config its members are filled in from, of its own kind
    for name in ("clip", "classifier", "ensemble"):
        kind = get_teacher_kind(name)
        assert group_option("teacher", kind.defaults_option or name)["kind"] == name


@pytest.fixture(scope="module")
def two_classifiers():
    return _ensemble(FIRST, SECOND), [_alone(FIRST)[1], _alone(SECOND)[1]]


def test_logits_are_the_log_of_the_members_mean_softmax(two_classifiers):
    ensemble, alone = two_classifiers
    batch = {"image": torch.randn(4, 3, 32, 32)}
    out = ensemble(batch, {LOGITS, MEMBER_LOGITS})
    z1, z2 = (source(batch, {LOGITS})[LOGITS] for source in alone)
    # Every member sees the view it sees alone (the second one resized to 40 px and re-normalised): bit for bit.
    assert out[MEMBER_LOGITS].shape == (4, 2, 3) and out[MEMBER_LOGITS].dtype == torch.float32
    assert torch.equal(out[MEMBER_LOGITS][:, 0], z1) and torch.equal(out[MEMBER_LOGITS][:, 1], z2)
    assert not torch.allclose(z1, z2)
    mean = (F.softmax(z1.double(), -1) + F.softmax(z2.double(), -1)) / 2  # averaged after the softmax
    assert out[LOGITS].dtype == torch.float32
    assert torch.allclose(out[LOGITS].double(), mean.log(), atol=1e-6)
    assert torch.allclose(F.softmax(out[LOGITS].double(), -1), mean, atol=1e-6)  # T = 1: the mean distribution
    assert set(ensemble(batch, {MEMBER_LOGITS})) == {MEMBER_LOGITS}


def test_member_weights_weight_the_distributions(two_classifiers):
    ensemble, (a, b) = two_classifiers
    members = list(ensemble.teacher.members)
    weighted = LiveTeacherSource(EnsembleTeacher(members, [3, 1], mean=DATA["mean"], std=DATA["std"], identity={}),
                                 DATA["mean"], DATA["std"])
    assert weighted.teacher.weights == [0.75, 0.25]
    batch = {"image": torch.randn(3, 3, 32, 32)}
    p_a, p_b = (F.softmax(source(batch, {LOGITS})[LOGITS].double(), -1) for source in (a, b))
    p = 0.75 * p_a + 0.25 * p_b
    assert torch.allclose(weighted(batch, {LOGITS})[LOGITS].double(), p.log(), atol=1e-6)
    # far-apart logits: the log-sum-exp keeps a probability that would underflow in float32 finite
    z = torch.tensor([[[0.0, -200.0], [0.0, -80.0]]])
    assert torch.isfinite(average_log_probs(z)).all()
    assert torch.allclose(average_log_probs(z), torch.tensor([[0.0, -80.0 - torch.log(torch.tensor(2.0))]]), atol=1e-4)


def test_a_clip_member_gives_its_zero_shot_logits_beside_a_classifier():
    ensemble = _ensemble("tiny", FIRST)
    clip, clip_source = _alone({"teacher": "tiny"})
    text = clip.class_embeddings(CLASSES, DATA["templates"])
    zero_shot = ZeroShotLogits(clip_source, text, clip.logit_scale)  # what a run with teacher=tiny reads as logits
    batch = {"image": torch.randn(2, 3, 32, 32)}
    out = ensemble(batch, {LOGITS, MEMBER_LOGITS})
    assert torch.equal(out[MEMBER_LOGITS][:, 0], zero_shot(batch, {LOGITS})[LOGITS])
    assert torch.equal(out[MEMBER_LOGITS][:, 1], _alone(FIRST)[1](batch, {LOGITS})[LOGITS])
    assert torch.allclose(out[LOGITS], average_log_probs(out[MEMBER_LOGITS]))
    identity = ensemble.teacher.identity
    assert identity["kind"] == "ensemble" and [m["model"] for m in identity["members"]] == ["pand-tiny-vit",
                                                                                         "test_resnet"]
    context = ENSEMBLE.context(ensemble.teacher)
    assert context["num_classes"] == 3 and context["member_weights"] == [0.5, 0.5]


def test_a_low_precision_pass_agrees_with_fp32(two_classifiers):
    ensemble, _ = two_classifiers
    batch = {"image": torch.randn(8, 3, 32, 32)}

    def compute(precision):
        with torch.no_grad(), teacher_autocast("cpu", precision):
            return ensemble(batch, {LOGITS})[LOGITS]

    probe = AgreementProbe("bf16", what="the ensemble's logits")
    out = probe(compute)
    assert out.dtype == torch.float32 and probe.stats["max_rel_error"] < 0.02


def test_members_get_their_kinds_defaults_as_teacher_equals_would():
    def filled(*members):
        return [settings for _, settings in members_of({"members": list(members)})[0]]

    def composed(*overrides):
        return to_plain(compose("train", list(overrides)))["teacher"]

    assert filled({"kind": "classifier", "ckpt": "a.ckpt"}) == [composed("teacher=classifier", "teacher.ckpt=a.ckpt")]
    assert filled("fmnist_clip") == [composed("teacher=fmnist_clip")]
    assert filled({"teacher": "vit_b16", "logit_scale": "learned"}) == [
        composed("teacher=vit_b16", "teacher.logit_scale=learned")]
    assert filled({"kind": "clip", "model": "ViT-B-16", "pretrained": "x"}) == [
        composed("teacher=vit_b16", "teacher.pretrained=x")]
    # as written on the command line
    teacher = composed("teacher=ensemble", "teacher.members=[{kind: classifier, ckpt: runs/a/best.ckpt},fmnist_clip]")
    assert filled(*teacher["members"]) == [composed("teacher=classifier", "teacher.ckpt=runs/a/best.ckpt"),
                                            composed("teacher=fmnist_clip")]
    # every selectable teacher config reads as Hydra composes it
    for name in config_groups()["teacher"]:
        assert group_option("teacher", name) == composed(f"teacher={name}")


def test_the_spec_is_the_members_specs(tmp_path):
    weights = tmp_path / "teacher.pth"
    torch.save(create_classifier("test_resnet", "timm", 3).state_dict(), weights)
    member = {"kind": "classifier", "model": "test_resnet", "weights": str(weights)}
    settings = {"members": [member, "tiny"]}
    spec = ENSEMBLE.spec(settings)
    assert spec == {"kind": "ensemble", "members": [get_teacher_kind("classifier").spec(members_of(settings)[0][0][1]),
                                                     get_teacher_kind("clip").spec(group_option("teacher", "tiny"))]}
    torch.save(create_classifier("test_resnet", "timm", 3).state_dict(), weights)  # new weights, same path
    assert ENSEMBLE.spec(settings) != spec
    other_clip = {"members": [member, {"teacher": "tiny", "pretrained": "random:1"}]}
    assert ENSEMBLE.spec(other_clip) != ENSEMBLE.spec(settings)


@pytest.mark.parametrize(("members", "message"), [
    ([], "teacher.members=[]: a teacher ensemble needs a non-empty list of teachers"),
    (None, "teacher.members=null: a teacher ensemble needs a non-empty list"),
    ([{"kind": "ensemble", "members": [FIRST]}], "teacher.members[0]={kind: ensemble, members: "),
    (["ensemble"], "teacher.members[0]=ensemble: a teacher ensemble cannot be a member of another"),
    ([{"ckpt": "a.ckpt"}], "teacher.members[0]={ckpt: a.ckpt} does not say its kind"),
    ([{"kind": "vlm"}], "teacher.members[0].kind='vlm' is not allowed: expected one of 'clip', 'classifier'"),
    (["fmnist_clp"], "'fmnist_clp' is not a teacher config; did you mean 'fmnist_clip'?"),
    ([{"kind": "clip", "pretrained": "random"}], "does not give model, which every clip teacher config sets"),
    ([{"kind": "classifier", "ckpt": "a.ckpt", "cpkt": "b"}], "teacher.members[0].cpkt: a classifier teacher has no "
                                                              "such setting; did you mean teacher.members[0].ckpt?"),
    ([{"kind": "classifier"}], "teacher.members[0] ({kind: classifier}): a classifier teacher needs exactly one of"),
    ([{"teacher": "tiny", "text_features": "x.safetensors"}],
     "teacher.members[0].text_features='x.safetensors' is set, but a member of a teacher ensemble reads no learned"),
])
def test_bad_members_are_refused_with_their_place(members, message):
    errors = ENSEMBLE.setting_errors({"members": members, "member_weights": None})
    assert any(message in e for e in errors), errors
    with pytest.raises(ConfigError, match="teacher ensemble setting"):
        ENSEMBLE.load({"members": members}, data=DATA, classes=CLASSES, device="cpu")


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as refused:
        ENSEMBLE.spec({"members": [{"kind": "clip"}, 3, FIRST], "member_weights": [1, -1]})
    text = str(refused.value)
    assert text.startswith("3 invalid teacher ensemble settings:")
    assert "teacher.members[0]" in text and "teacher.members[1]=3 is not a teacher" in text
    assert ("teacher.member_weights=[1, -1] is not allowed: expected null (equal weights) or a list of 3 numbers > 0"
            in text)


def test_a_member_for_other_classes_is_refused_by_name(tmp_path):
    weights = tmp_path / "five.pth"
    torch.save(create_classifier("test_resnet", "timm", 5).state_dict(), weights)
    other = {"kind": "classifier", "model": "test_resnet", "weights": str(weights)}
    with pytest.raises(WeightsUnavailableError, match=r"teacher.members\[1\] \(\{kind: classifier, model: test_resnet, "
                                                      r"weights: .*five.pth\}\): .* does not fit test_resnet with 3 "
                                                      "classes"):
        ENSEMBLE.load({"members": [FIRST, other]}, data=DATA, classes=CLASSES, device="cpu")
    first, second = _alone(FIRST)[0], _alone(SECOND)[0]
    second.num_classes = 4  # a member that answers over another class count
    with pytest.raises(ConfigError, match=r"different class counts \[3, 4\]"):
        EnsembleTeacher([EnsembleMember(t, DATA["mean"], DATA["std"]) for t in (first, second)], mean=DATA["mean"],
                        std=DATA["std"], identity={})


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=vl2lite"], "method 'vl2lite' reads ['image_embeds'], which a ensemble teacher does not provide (it "
                         "provides ['logits', 'member_logits']); use a teacher that does (teacher.kind=clip)"),
    (["method=nrkd"], "reads ['stage_features'], which a ensemble teacher does not provide"),
    (["method=kd", "cache.dir=/tmp/pand-ensemble-cache", "cache.views=2", "cache.topk=2"],
     "cache.topk=2 is set, but a ensemble teacher's cache stores member_logits, not logits"),
])
def test_reads_an_ensemble_does_not_provide_are_refused_before_loading(cub_root, tmp_path, overrides, message):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", "teacher=ensemble",
                                                      "teacher.members=[tiny]", *overrides)))
    with pytest.raises(ConfigError) as refused:
        validate_train_config(config)
    assert message in str(refused.value)


def test_each_member_needs_a_teacher_that_has_members(cub_root, tmp_path):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", "method=kd", "method.members=each")))
    with pytest.raises(ConfigError, match=r"reads \['member_logits'\], which a clip teacher does not provide .* use a "
                                          r"teacher that does \(teacher.kind=ensemble\)"):
        validate_train_config(config)


@pytest.mark.parametrize("mode", ["mean", "each"])
def test_kd_distils_an_ensemble_end_to_end(cub_root, tmp_path, mode):
    # Members from pand checkpoints run end to end on the docs' page (docs/zoo.md, "Teacher ensembles"); random
    # classifiers here keep the test short.
    members = "teacher.members=[{kind: classifier, model: test_resnet, pretrained: 'random:1'},{kind: classifier, " \
              "model: test_resnet, pretrained: 'random:2'}]"
    run = tmp_path / mode
    assert main(["train", *tiny_overrides(cub_root, run, "teacher=ensemble", members, "teacher.member_weights=[2,1]",
                                          "method=kd", f"method.members={mode}", "student=timm",
                                          "student.name=test_resnet", "trainer.max_epochs=1", "test=false")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "kd" and summary["teacher"] == "ensemble" and summary["val_acc1"] is not None
    assert "train/kd" in (run / "metrics.csv").read_text()
