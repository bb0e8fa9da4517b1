"""The command line itself: help, --version, typo suggestions, -m, trainer.* arguments, stdout holding the result
alone, and the logging set-up. Nothing here trains a model."""

import inspect
import json
import logging
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import pand
from pand import config_catalogue
from pand.cli import COMMANDS, main
from pand.config import PAND_TRAINER_ARGS, TRAINER_ARGS, compose, to_plain
from pand.errors import ConfigError
from pand.logs import setup_logging

HEAVY = ("torch", "lightning", "hydra", "open_clip", "timm")


def run_in_clean_interpreter(*argv: str) -> tuple[int, str, str, list[str]]:
    """``main(argv)`` in a fresh Python; returns the status, stdout, stderr and the heavy modules it imported."""
    code = textwrap.dedent(f"""
        import json, sys
        from pand.cli import main
        rc = main({list(argv)!r})
        sys.stdout.flush()
        print("\\nHEAVY=" + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)
        sys.exit(rc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    err, _, heavy = done.stderr.rpartition("HEAVY=")
    return done.returncode, done.stdout, err, json.loads(heavy)


# ------------------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("argv", [
    ["train", "--help"], ["config", "-h"], ["features", "--help"], ["prompts", "--help"], ["cache", "build", "--help"],
    ["eval", "--help"], ["predict", "-h"], ["export", "--help"], ["teacher", "--help"], ["sweep", "--help"],
    ["gather", "--help"], ["quickstart", "--help"], ["--help"], ["train", "data=cub", "-m", "--help"],
    ["bench", "--help"], ["teacher", "fit", "--help"],
])
def test_help_is_printed_without_importing_torch_lightning_or_hydra(argv):
    rc, out, err, heavy = run_in_clean_interpreter(*argv)
    assert rc == 0, err
    assert heavy == []
    assert "usage" in out.lower() if argv != ["--help"] else "pand COMMAND --help" in out


def test_train_help_lists_scanned_groups_settings_examples_and_offline_hint(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    groups = config_catalogue.config_groups()
    folders = {p.name for p in config_catalogue.CONFIGS_DIR.iterdir() if p.is_dir() and any(p.rglob("*.yaml"))}
    assert set(groups) == folders
    for group, options in groups.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {group} "))
        assert options[0] in line or f"[{options[0]}]" in line
        assert all(o in out for o in options)
    assert "[cub]" in out  # train.yaml's default data option is marked
    assert re.search(r"run_dir=null +default: ", out)  # a setting with its comment from train.yaml
    for example in ("pand train data=cub method=vl2lite student=resnet18 trainer=gpu",
                    "pand train experiment=pand/cub_resnet18", "pand train -m optim.lr=1e-3,3e-3",
                    "pand config --resolve data=cub"):
        assert example in out
    assert "HF_HUB_OFFLINE=1" in out and "trainer.NAME=VALUE" in out


@pytest.mark.parametrize("command", ["features", "prompts"])
def test_stage1_help_shows_its_section_and_the_offline_hint(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: pand {command}" in out and "HF_HUB_OFFLINE=1" in out
    assert "features.batch_size=" in out and "config groups" in out


def test_shared_base_configs_are_not_offered_as_options():
    from pand.config_catalogue import config_groups

    groups = config_groups()
    assert "cub" in groups["data"] and "vit_b16" in groups["teacher"] and "vl2lite/cub_resnet18" in groups["experiment"]
    assert not [o for g in groups.values() for o in g if o.split("/")[-1].startswith("_") or o == "base"]


def test_help_command_and_help_flag_agree(capsys):
    assert main(["help", "config"]) == 0
    via_help = capsys.readouterr().out
    assert main(["config", "--help"]) == 0
    assert capsys.readouterr().out == via_help and "--resolve" in via_help


def test_config_catalogue_is_scanned_from_the_folders(tmp_path):
    (tmp_path / "experiment" / "vl2lite").mkdir(parents=True)
    (tmp_path / "experiment" / "vl2lite" / "cub_resnet18.yaml").write_text("{}\n")
    (tmp_path / "experiment" / "demo.yaml").write_text("{}\n")
    (tmp_path / "logger").mkdir()
    (tmp_path / "logger" / "csv.yaml").write_text("{}\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "train.yaml").write_text(textwrap.dedent("""\
        # a block comment
        defaults:
          - logger: csv
          - _self_
          - experiment: null

        seed: 0
        run_dir: null        # where the run goes
        cache:               # teacher cache
          dir: null          # a folder
          topk: null         # first line
                             # second line
        # a block comment before a key
        test: true
    """))
    assert config_catalogue.config_groups(tmp_path) == {"experiment": ["demo", "vl2lite/cub_resnet18"], "logger": ["csv"]}
    assert config_catalogue.group_defaults("train", tmp_path) == {"logger": "csv", "experiment": None}
    settings = {s.key: s for s in config_catalogue.config_settings("train", tmp_path)}
    assert list(settings) == ["seed", "run_dir", "cache", "test"]
    assert settings["run_dir"].comment == "where the run goes"
    assert [(c.key, c.comment) for c in settings["cache"].children] == [
        ("dir", "a folder"), ("topk", "first line second line")]
    assert settings["test"].comment == ""


# --------------------------------------------------------------------------------------------------------- version
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    rc, out, err, heavy = run_in_clean_interpreter(flag)
    assert rc == 0 and out.strip() == f"pand {pand.__version__}" and heavy == []


# ----------------------------------------------------------------------------------------------------------- typos
@pytest.mark.parametrize(("override", "suggestion"), [
    ("trainer.max_epoch=3", "did you mean trainer.max_epochs=3?"),
    ("optim.lr_=1", "did you mean optim.lr=1?"),
    ("methd=kd", "did you mean method=kd?"),
    ("optm.lr=1", "did you mean optim.lr=1?"),
    ("data=cubb", "did you mean data=cub?"),
    ("student=resnet81", "did you mean student=resnet18?"),
    ("~optim.lrr", "did you mean ~optim.lr?"),
])
def test_a_misspelt_override_is_refused_with_a_suggestion(override, suggestion, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand train: error: ") and suggestion in err
    assert "To append" not in err and "+" + override not in err and "Traceback" not in err


def test_an_unknown_group_option_lists_the_options(capsys):
    assert main(["config", "data=cubb"]) == 2
    err = capsys.readouterr().err
    assert "unknown data option 'cubb'" in err
    assert "data options: " + ", ".join(config_catalogue.config_groups()["data"]) in err


def test_a_typo_is_refused_before_torch_is_imported():
    rc, out, err, heavy = run_in_clean_interpreter("train", "trainer.max_epoch=3")
    assert rc == 2 and out == "" and "did you mean trainer.max_epochs=3?" in err
    assert "torch" not in heavy and "lightning" not in heavy
    rc, _, err, heavy = run_in_clean_interpreter("train", "optim.lr=-1")  # validate_train_settings, no torch
    assert rc == 2 and "optim.lr=-1 is not allowed" in err and "torch" not in heavy


def test_an_unknown_command_gets_the_closest_one(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand: error: unknown command 'trian'; did you mean pand train?")
    assert main(["cache", "biuld"]) == 2
    assert "did you mean pand cache build?" in capsys.readouterr().err


def test_an_unknown_flag_is_refused(capsys):
    assert main(["train", "--max-epochs", "3"]) == 2
    assert "pand train: error: unknown option '--max-epochs'" in capsys.readouterr().err


def test_a_sweep_without_multirun_points_at_m(capsys):
    assert main(["train", "optim.lr=1e-3,3e-3"]) == 2
    err = capsys.readouterr().err
    assert "several values" in err and "-m" in err


def test_a_key_that_exists_is_not_added_with_plus():
    with pytest.raises(ConfigError, match=r"optim.lr is already in the config .* write optim.lr=1 without the \+"):
        compose("train", ["+optim.lr=1"])


# -------------------------------------------------------------------------------------------------------- multirun
@pytest.mark.parametrize("flag", ["-m", "--multirun"])
def test_multirun_flag_anywhere_dispatches_to_the_sweep(flag, monkeypatch):
    seen = []
    monkeypatch.setattr("pand.analysis.sweep.main_sweep", lambda args: seen.append(args) or 0)
    assert main(["train", "data=cub", flag, "optim.lr=1e-3,3e-3", "--sweep-dir", "x"]) == 0
    assert seen == [["data=cub", "optim.lr=1e-3,3e-3", "--sweep-dir", "x"]]


# ---------------------------------------------------------------------------------------------- trainer arguments
def test_static_trainer_arguments_match_lightning():
    import lightning

    params = [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]
    assert TRAINER_ARGS == tuple(params), "update pand.config.TRAINER_ARGS to this Lightning version"
    assert set(PAND_TRAINER_ARGS) <= set(TRAINER_ARGS)


def test_any_trainer_argument_composes_without_plus():
    cfg = compose("train", ["trainer.benchmark=true", "trainer=cpu", "trainer.max_epochs=3",
                            "+trainer.detect_anomaly=true", "trainer.max_time=00:01:00:00"])
    assert cfg.trainer.benchmark is True and cfg.trainer.max_epochs == 3 and cfg.trainer.detect_anomaly is True
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_time == "00:01:00:00"


@pytest.mark.parametrize(("override", "pointer"), [
    ("trainer.logger=false", "logger="),
    ("+trainer.logger=false", "logger="),
    ("trainer.callbacks=[]", "callbacks="),
    ("trainer.default_root_dir=/tmp/x", "run_dir="),
    ("trainer.enable_checkpointing=false", "checkpoint.every_n_steps"),
    ("trainer.plugins=[]", "trainer.precision"),
    ("trainer.use_distributed_sampler=true", "trainer.strategy"),
])
def test_trainer_arguments_pand_sets_are_refused_with_the_right_place(override, pointer, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    key = override.lstrip("+").split("=")[0]
    assert err.startswith(f"pand train: error: {key} is set by pand") and pointer in err
    assert "TypeError" not in err


def test_the_logger_pointer_lists_the_scanned_options():
    options = config_catalogue.config_groups().get("logger")
    with pytest.raises(ConfigError) as caught:
        compose("train", ["trainer.logger=false"])
    if options:
        assert "logger=" + "|".join(options) in str(caught.value)


def test_an_unknown_trainer_argument_says_so(capsys):
    assert main(["train", "trainer.no_such_argument=1"]) == 2
    assert "not an argument of lightning.Trainer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- config
def test_config_resolve_resolves_interpolations(capsys):
    assert main(["config", "data=cub"]) == 0
    raw = capsys.readouterr().out
    assert "${" in raw
    assert main(["config", "--resolve", "data=cub"]) == 0
    resolved = capsys.readouterr().out
    assert "${" not in resolved
    assert OmegaConf.to_container(OmegaConf.create(resolved)) == to_plain(compose("train", ["data=cub"]))


# ------------------------------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("args", [[], ["data.root=/x"], ["ckpt_path="]])
def test_eval_without_a_checkpoint_asks_for_one(args, capsys):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pand eval: error: pand eval needs ckpt_path=PATH")
    assert "usage: pand eval ckpt_path=PATH" in err and "???" not in err


# ------------------------------------------------------------------------------------------------ stdout = result
def test_train_prints_only_its_json_on_stdout(monkeypatch, capsys):
    def fake_train(config):
        print("Epoch 0: 100%|##########| progress bar text")  # Lightning's tqdm bar writes to sys.stdout
        return {"status": "done", "epochs": config["trainer"]["max_epochs"]}

    monkeypatch.setattr("pand.engine.run.train", fake_train)
    assert main(["train", "trainer.max_epochs=1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"status": "done", "epochs": 1}
    assert "progress bar text" in captured.err


def test_config_prints_only_yaml_on_stdout(capsys):
    assert main(["config", "seed=3"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).seed == 3


# --------------------------------------------------------------------------------------------------------- logging
def test_lightning_tips_are_dropped_and_other_lines_kept():
    setup_logging()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # as `import lightning` leaves it (alone, this test runs before anything imports it)
    try:
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                 "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics")
        log.info("💡 Tip: For seamless cloud uploads and versioning, try installing "
                 "[litmodels](https://pypi.org/project/litmodels/) to enable LitModelCheckpoint")
        log.info("GPU available: False, used: False")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert seen == ["GPU available: False, used: False"]
    # lightning's own console handler prints its lines; they must not reach the root handler a second time
    assert logging.getLogger("lightning").propagate is False


def test_known_deprecation_warnings_are_silenced_narrowly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                      "treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_pand_never_sets_hf_hub_offline():
    setting = re.compile(r"environ\[\s*['\"]HF_HUB_OFFLINE['\"]\s*\]\s*=(?!=)|"
                         r"(setdefault|putenv)\(\s*['\"]HF_HUB_OFFLINE|environ\.update\([^)]*HF_HUB_OFFLINE")
    src = Path(pand.__file__).parent
    offenders = [str(p) for p in src.rglob("*.py") if setting.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_every_command_has_help(capsys):
    for command in COMMANDS:
        args = ["teacher", "--help"] if command == "teacher" else [command, "--help"]
        assert main(args) == 0, command
        assert "usage" in capsys.readouterr().out.lower(), command


# --------------------------------------------------------------------------------------------- one line per error
@pytest.mark.parametrize(("argv", "line"), [
    (["bench", "--batch", "abc"], "pand bench: error: argument --batch: invalid int value: 'abc' (pand bench --help)"),
    (["sweep", "--zzz"], "pand sweep: error: unrecognized arguments: --zzz (pand sweep --help)"),
    (["gather", "runs"], "pand gather: error: the following arguments are required: --out (pand gather --help)"),
    (["tsne", "--out", "figs"],
     "pand tsne: error: the following arguments are required: CKPT_OR_OVERRIDE (pand tsne --help)"),
    (["tsne", "a.ckpt", "foo=1", "--out", "figs"],
     "pand tsne: error: only data.* overrides are accepted, got foo=1 (pand tsne --help)"),
    (["quickstart", "--seeds", "two"],
     "pand quickstart: error: argument --seeds: invalid int value: 'two' (pand quickstart --help)"),
    (["teacher", "fit", "--epochs", "1.5"],
     "pand teacher: error: argument --epochs: invalid int value: '1.5' (pand teacher fit --help)"),
    (["train", "-m", "--sweep-dir"],
     "pand train: error: argument --sweep-dir: expected one argument (pand sweep --help)"),
    (["gather", "runs", "--out", "o", "--x", "a", "b\nc"],
     "pand gather: error: unrecognized arguments: b\\nc (pand gather --help)"),
])
def test_usage_errors_of_argparse_commands_are_one_line_like_the_others(argv, line, capsys):
    import argparse

    usual = argparse.ArgumentParser.error
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"
    assert argparse.ArgumentParser.error is usual  # only for the time of the command


def test_argparse_help_still_exits_0(capsys):
    assert main(["gather", "--help"]) == 0
    assert "usage: pand gather" in capsys.readouterr().out


def test_eval_export_and_bench_options_are_refused_before_torch_is_imported(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not read")
    for argv, message in (
        (["eval", f"ckpt_path={ckpt}", "splits=[train]"], "splits=['train'] is not allowed"),
        (["export", f"ckpt_path={ckpt}", "format=tflite", f"out={tmp_path / 'x'}"], "format='tflite' is not allowed"),
        (["bench", "--steps", "0"], "--steps=0 is not allowed: expected an integer >= 1"),
    ):
        rc, out, err, heavy = run_in_clean_interpreter(*argv)
        assert rc == 2 and out == "" and message in err and err.strip().count("\n") == 0, err
        assert heavy == [], argv
