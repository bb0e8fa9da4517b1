"""Every shipped experiment config (the papers' recipes) composes and passes validation; the published settings
that the docs quote are the ones the config sets."""

from pathlib import Path

import pytest

import pand
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config
from pand.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (Path(pand.__file__).parent / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipe_composes_and_validates(name):
    # protocol_* configs are the shared bases of the recipes and leave the method to them
    method = ["method=kd"] if name.startswith("protocol_") else []
    config = to_plain(compose("train", [f"experiment={name}", *method]))
    if config["teacher"].get("kind") == "classifier":
        # Recipes leave the teacher's weights to the user; give the random stand-in tests use.
        config["teacher"]["pretrained"] = "random"
    validate_train_config(config)


def _recipe(name):
    return to_plain(compose("train", [f"experiment={name}"]))


def test_mdistiller_cifar_protocol_settings():
    kd, dkd = _recipe("cifar100_r32x4_r8x4_kd"), _recipe("cifar100_r32x4_r8x4_dkd")
    for c in (kd, dkd):
        assert (c["teacher"]["model"], c["student"]["name"], c["data"]["image_size"]) == ("resnet32x4", "resnet8x4", 32)
        assert c["scheduler"]["milestones"] == [150, 180, 210] and c["trainer"]["max_epochs"] == 240
    assert dkd["method"] == {"name": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0,
                             "warmup_epochs": 20, "standardize": False}
    ls = _recipe("cifar100_r32x4_r8x4_kd_ls")["method"]
    assert ls["standardize"] and ls["temperature"] == 2.0 and ls["kd_weight"] == 9.0


def test_vit_student_recipe_mixes_and_refuses_a_cache():
    c = _recipe("cifar100_224_convnext_t_deit_t_pat")
    assert c["mixing"]["mixup_alpha"] == 0.8 and c["mixing"]["cutmix_alpha"] == 1.0 and c["callbacks"]["ema"]["decay"] == 0.99996
    c["teacher"]["pretrained"] = "random"
    c["cache"]["dir"] = "/tmp/some-cache"
    with pytest.raises(ConfigError, match="unmixed views"):
        validate_train_config(c)


def test_an_option_of_another_method_is_refused_before_anything_is_built():
    config = to_plain(compose("train", ["experiment=cifar100_r32x4_r8x4_dkd", "teacher.pretrained=random",
                                        "+method.kd_weight=0.9"]))
    with pytest.raises(ConfigError, match="has no option"):
        validate_train_config(config)
