"""Names from papers and other toolkits are answered with pand's exact overrides, and those overrides are real."""

import pytest

from pand.config import compose, to_plain
from pand.config_catalogue import config_groups
from pand.errors import ConfigError
from pand.known_names import KNOWN, equivalent, normalise


@pytest.mark.parametrize(("group", "name"), [(g, n) for g, names in KNOWN.items() for n in names])
def test_every_known_name_answers_with_overrides_that_compose(group, name):
    found = KNOWN[group][name]
    assert found.why
    if not found.overrides:  # a command of its own (CoOp): the answer names it
        assert "pand prompts" in found.why
        return
    config = to_plain(compose("train", list(found.overrides)))
    for override in found.overrides:
        key, value = override.split("=", 1)
        if key in config_groups():
            assert value in config_groups()[key], override
            continue
        node = config
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value, override
    # a key is in the normal form users' spellings are reduced to, and is not a config's own name respelt (those are
    # answered without a table)
    assert normalise(name) == name and name not in [normalise(o) for o in config_groups()[group]]


@pytest.mark.parametrize(("line", "expected"), [
    ("method=ls", "write method=kd method.standardize=true"),
    ("method=LS-KD", "write method=kd method.standardize=true"),
    ("method=DKD_LS", "write method=dkd method.standardize=true"),
    ("method=KDEOV", "write method=openvocab method.icl_weight=0"),
    ("student=MobileNet-V2", "write student=mobilenet_v2"),
    ("teacher=ViT-B/16", "write teacher=vit_b16"),
    ("data=CUB_200_2011", "write data=cub"),
    ("method=coop", "pand prompts"),
])
def test_pand_train_answers_a_foreign_name_in_one_line(line, expected):
    with pytest.raises(ConfigError) as err:
        compose("train", [line])
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert message.startswith(f"{line} is not a pand")


def test_model_names_of_the_libraries_are_answered_with_student_name_or_teacher_model():
    choices = config_groups()
    assert equivalent("student", "efficientnet_b0", choices["student"]).overrides == (
        "student=resnet18", "student.name=efficientnet_b0")  # a torchvision model
    assert equivalent("student", "regnety_002", choices["student"]).overrides == (
        "student=timm", "student.name=regnety_002")  # timm only
    teacher = equivalent("teacher", "rn50", choices["teacher"])  # open_clip's RN50, any spelling
    assert teacher.overrides[:3] == ("teacher=vit_b16", "teacher.model=RN50", "teacher.pretrained=openai")
    assert "teacher.force_quick_gelu=true" in teacher.overrides
    config = to_plain(compose("train", list(teacher.overrides)))
    assert (config["teacher"]["model"], config["teacher"]["pretrained"]) == ("RN50", "openai")


def test_a_name_nobody_uses_still_gets_the_list_of_options():
    assert equivalent("method", "foo", config_groups()["method"]) is None
    with pytest.raises(ConfigError, match="unknown method option 'foo'.*method options: ce, dkd"):
        compose("train", ["method=foo"])


def test_a_missing_library_leaves_the_list_of_options():
    def missing(*args):
        raise ImportError("no timm")

    assert equivalent("student", "regnety_002", config_groups()["student"], library=missing) is None
