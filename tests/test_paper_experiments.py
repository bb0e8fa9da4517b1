"""The 16 paper cells, experiment/{vl2lite,pand}/<dataset>_<student>.yaml: each composes with the train config,
passes validation, and resolves to the authors' recipe (VL2Lite, CVPR 2025; PAND, arXiv 2602.07768)."""

from pathlib import Path

import pytest
import torch

import pand
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config, validate_train_settings
from pand.stage1.checks import validate_coop_config

EXPERIMENTS = Path(pand.__file__).parent / "configs" / "experiment"
DATASETS = ("cub", "aircraft", "pets", "dogs")
STUDENTS = ("resnet18", "mobilenet_v2")
CELLS = [f"{m}/{d}_{s}" for m in ("vl2lite", "pand") for d in DATASETS for s in STUDENTS]
# The prompt template of the authors' data configs (the same in VL2Lite's and PAND's code).
TEMPLATES = {
    "cub": "a photo of {}, a type of bird",
    "aircraft": "a photo of {}, one of the airplane models",
    "pets": "a photo of {}, a type of pet",
    "dogs": "a photo of {}, a type of dog",
}
NUM_CLASSES = {"cub": 200, "aircraft": 100, "pets": 37, "dogs": 120}


def cell(name, tmp_path, *extra):
    return to_plain(compose("train", [f"experiment={name}", f"paths.runs_dir={tmp_path}", *extra]))


def test_the_grid_is_complete_and_nothing_else_is_a_cell():
    found = sorted(f"{p.parent.name}/{p.stem}" for m in ("vl2lite", "pand")
                   for p in (EXPERIMENTS / m).glob("*.yaml") if not p.stem.startswith("_"))
    assert found == sorted(CELLS)
    for name in CELLS:  # a cell is short: the shared recipe lives in the method's _base.yaml
        text = (EXPERIMENTS / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n") and f"- /experiment/{name.split('/')[0]}/_base" in text
        assert len(text.splitlines()) <= 12


@pytest.mark.parametrize("name", CELLS)
def test_cell_composes_validates_and_follows_the_shared_settings(name, tmp_path):
    method, rest = name.split("/")
    dataset, student = rest.split("_", 1)
    config = cell(name, tmp_path)
    validate_train_settings(config)
    validate_train_config(config)
    if method == "pand":
        validate_coop_config(config, writes_prompts=False)
        validate_coop_config(config, writes_prompts=True)
    from pand.engine.builders import target_errors

    assert target_errors(config) == []

    assert config["method"]["name"] == method
    assert (config["data"]["name"], config["data"]["num_classes"]) == (dataset, NUM_CLASSES[dataset])
    assert config["data"]["templates"] == [TEMPLATES[dataset]]
    assert (config["student"]["name"], config["student"]["source"], config["student"]["pretrained"]) == (
        student, "torchvision", "IMAGENET1K_V1")
    t = config["teacher"]
    assert (t["kind"], t["model"], t["pretrained"]) == ("clip", "convnext_xxlarge", "laion2b_s34b_b82k_augreg_soup")
    assert t["logit_scale"] == pytest.approx(1 / 0.07)
    tr = config["trainer"]
    assert (tr["strategy"], tr["accelerator"], tr["devices"], tr["sync_batchnorm"]) == ("ddp", "gpu", 4, True)
    assert (tr["max_epochs"], tr["precision"]) == (300, "32-true")
    assert config["callbacks"]["early_stopping"]["patience"] == 100
    assert config["callbacks"]["early_stopping"]["monitor"] == "val/acc1"
    d = config["data"]
    assert (d["image_size"], d["resize_size"]) == (224, 256)
    assert d["augment"] == {"min_crop_frac": pytest.approx(192 / 224), "degrees": 60.0, "blur": True,
                            "blur_kernel": 5, "blur_sigma": [1.0e-5, 10.0], "brightness": 0.3, "contrast": 0.1,
                            "saturation": 0.1, "hue": 0.1, "flip_p": 0.5}
    assert d["mean"] == [0.48145466, 0.4578275, 0.40821073] and d["std"] == [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("name", [c for c in CELLS if c.startswith("vl2lite/")])
def test_vl2lite_recipe(name, tmp_path):
    config = cell(name, tmp_path)
    assert config["optim"] == {"_target_": "torch.optim.AdamW", "lr": 1.0e-4, "weight_decay": 0.0}
    assert config["scheduler"] == {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 30, "gamma": 0.5,
                                   "interval": "epoch", "warmup_epochs": 0}
    # pand's data.batch_size is per DDP process: 4 GPUs x 128 = the authors' 512
    assert config["data"]["batch_size"] == 128
    assert config["data"]["batch_size"] * config["trainer"]["devices"] == 512
    assert config["method"] == {"name": "vl2lite", "temperature": 2.0, "linguistic_scale": 0.5,
                                "weight_schedule": "code"}
    assert config["teacher"]["text_features"] is None


@pytest.mark.parametrize("name", [c for c in CELLS if c.startswith("pand/")])
def test_pand_recipe_for_both_stages(name, tmp_path):
    config = cell(name, tmp_path)
    # stage 1 (CoOp on stored teacher features)
    assert config["prompts"] == {
        "n_ctx": 16, "ctx_init": None, "csc": False, "class_token_position": "end", "epochs": 200, "batch_size": 32,
        "lr": 0.002, "momentum": 0.9, "weight_decay": 0.0, "warmup_epochs": 0, "warmup_lr": 1.0e-5,
        "logit_scale": "learned", "precision": "fp32", "precision_tolerance": 0.02, "out": config["prompts"]["out"],
    }
    dataset = name.split("/")[1].split("_")[0]
    assert config["features"]["dir"] == f"{tmp_path}/features/{dataset}-convnext_xxlarge"
    assert config["features"]["splits"] == ["train", "val", "test"]
    # stage 2 finds stage 1's output without a path on the command line
    assert config["teacher"]["text_features"] == config["prompts"]["out"]
    assert config["prompts"]["out"] == (f"{tmp_path}/features/{dataset}-convnext_xxlarge/"
                                        "learned_text_features-nctx16-end.safetensors")
    # stage 2 (VL2Lite with the learned text features + NLRD)
    assert config["optim"] == {"_target_": "torch.optim.AdamW", "lr": 1.0e-4, "weight_decay": 1.0e-4}
    assert config["scheduler"] == {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 100,
                                   "eta_min": 1.0e-5, "interval": "epoch", "warmup_epochs": 0}
    assert config["data"]["batch_size"] == 32
    assert config["data"]["batch_size"] * config["trainer"]["devices"] == 128
    assert config["method"] == {"name": "pand", "temperature": 2.0, "linguistic_scale": None,
                                "weight_schedule": "code", "use_coop": True, "use_nlrd": True,
                                "nlrd": {"k": 3, "weight": 1.0, "gather": "local"}}


def test_stage1_overrides_reach_stage2_through_prompts_out(tmp_path):
    config = cell("pand/cub_resnet18", tmp_path, "prompts.n_ctx=4", "prompts.csc=true")
    assert config["teacher"]["text_features"] == config["prompts"]["out"]
    assert config["teacher"]["text_features"].endswith("learned_text_features-nctx4-end-csc.safetensors")


def _lrs(config, epochs):
    from pand.engine.builders import build_optimizer, build_scheduler

    optimizer = build_optimizer(config["optim"], [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(config["scheduler"], optimizer, max_epochs=config["trainer"]["max_epochs"],
                                total_steps=config["trainer"]["max_epochs"] * 10)["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_the_learning_rate_schedules(tmp_path):
    vl2lite = _lrs(cell("vl2lite/cub_resnet18", tmp_path), 300)
    assert vl2lite[0] == pytest.approx(1e-4) and vl2lite[29] == pytest.approx(1e-4)
    assert vl2lite[30] == pytest.approx(5e-5) and vl2lite[299] == pytest.approx(1e-4 * 0.5**9)
    pand_lrs = _lrs(cell("pand/cub_resnet18", tmp_path), 300)
    # cosine with T_max 100 over 300 epochs: down to eta_min at 100, back up to lr at 200, down again at 300
    assert pand_lrs[0] == pytest.approx(1e-4)
    assert pand_lrs[50] == pytest.approx(1e-5 + (1e-4 - 1e-5) / 2, rel=1e-3)
    assert pand_lrs[100] == pytest.approx(1e-5, rel=1e-3)
    assert pand_lrs[200] == pytest.approx(1e-4, rel=1e-3)
    assert min(pand_lrs) >= 1e-5 * (1 - 1e-6)


def test_the_docs_list_every_cell():
    page = Path(pand.__file__).parents[2] / "docs" / "pand.md"
    if not page.is_file():
        pytest.skip("docs/pand.md is not next to the source tree (installed package)")
    text = page.read_text()
    missing = [name for name in CELLS if f"experiment={name}" not in text and f"`{name}`" not in text]
    assert missing == []
