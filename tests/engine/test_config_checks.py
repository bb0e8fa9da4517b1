"""Every setting of a composed config (:mod:`pand.engine.config_checks`) is checked before any model or data is loaded;
errors name the option, the value and the range."""

import errno
import json
import os
from pathlib import Path

import pytest

from pand.cli import main
from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config
from pand.errors import ConfigError, OutputError
from pand.io import check_writable
from tests.engine.conftest import tiny_overrides


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the config was validated")

    monkeypatch.setattr("pand.teachers.clip.load_clip_teacher", refuse)
    monkeypatch.setattr("pand.engine.run.build_student", refuse)
    monkeypatch.setattr("pand.data.assembly.get_dataset", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 is not allowed: expected an integer >= 1"),
        (["data.batch_size=0"], "data.batch_size=0 is not allowed: expected an integer >= 1"),
        (["method=pand", "method.use_coop=false", "method.nlrd.k=0"],
         "method.nlrd.k=0 is not allowed: expected an integer >= 1"),
        (["method=pand", "method.use_coop=false", "data.batch_size=1"], "NLRD needs at least 2 samples per batch"),
        (["method=pand"], "method.use_coop=true needs teacher.text_features"),
        (["method=vl2lite", "teacher.text_features=/x/learned.safetensors"],
         "method 'vl2lite' with these options and a clip teacher does not read learned text features"),
        (["method=pand", "method.use_coop=false", "teacher.text_features=/x/learned.safetensors"],
         "method 'pand' with these options and a clip teacher does not read learned text features"),
        (["method=ce", "cache.dir=/tmp/x", "cache.views=2"], "method 'ce' reads no teacher outputs"),
        (["cache.dir=/tmp/x", "cache.views=0"], "a teacher cache needs at least 1 view"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 is not allowed: expected a number >= 0"),
        (["scheduler.interval=batch"], "scheduler.interval='batch' is not allowed: expected one of 'epoch', 'step'"),
        (["method.temperature=0"], "method.temperature=0 is not allowed: expected a number > 0"),
        (["method=kd", "method.kd_weight=-1"], "method.kd_weight=-1 is not allowed: expected a number >= 0"),
        (["method.weight_schedule=linear"], "method.weight_schedule='linear' is not allowed"),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0 is not allowed: expected a number >= 0 and < 1"),
        (["data.resize_size=16"], "data.resize_size=16 is smaller than data.image_size=32"),
        (["data.templates=[a photo]"], "data.templates[0]='a photo' has no '{}'"),
        (["trainer.devices=0"], "trainer.devices=0 is not allowed"),
        (["scheduler.warmup_epochs=5"], "scheduler.warmup_epochs=5 is not below trainer.max_epochs=2"),
        (["teacher.logit_scale=-1"], "teacher.logit_scale=-1 is not allowed: expected a number > 0 (or 'learned', null)"),
        (["checkpoint.every_n_steps=-2"], "checkpoint.every_n_steps=-2 is not allowed"),
        (["cache.dir=/tmp/x", "cache.precision=bf61"],
         "cache.precision='bf61' is not allowed: expected one of 'fp32', 'bf16', 'fp16' (did you mean 'bf16'?)"),
        (["cache.dir=/tmp/x", "cache.precision_tolerance=0"],
         "cache.precision_tolerance=0 is not allowed: expected a number > 0"),
        (["cache.precision=bf16"], "cache.precision=bf16 is set, but no teacher cache is used (cache.dir is unset)"),
    ],
)
def test_bad_settings_are_refused_before_anything_loads(cub_root, tmp_path, overrides, message, nothing_loads, capsys):
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", *overrides)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_every_problem_is_listed_at_once(cub_root, tmp_path):
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run", "trainer.max_epochs=0",
                                                      "data.batch_size=-4", "optim=sgd", "optim.momentum=1.5")))
    with pytest.raises(ConfigError, match="3 invalid training settings") as info:
        validate_train_config(config)
    for key in ("trainer.max_epochs=0", "data.batch_size=-4", "optim.momentum=1.5"):
        assert key in str(info.value)


def test_the_packaged_configs_are_valid(cub_root, tmp_path):
    for method in ("ce", "kd", "vl2lite"):
        validate_train_config(to_plain(compose("train", tiny_overrides(cub_root, tmp_path / method, f"method={method}"))))
    validate_train_config(to_plain(compose("train", ["method=pand", "teacher.text_features=/x.safetensors"])))
    validate_train_config(to_plain(compose("train", ["trainer=ddp", "data=fashion_mnist", "optim=sgd"])))


def test_run_folder_under_a_file_is_refused_up_front(cub_root, tmp_path, capsys, nothing_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", *tiny_overrides(cub_root, blocker / "run")]) == 2
    assert f"the run folder {blocker / 'run'} cannot be created: {blocker} is a file" in capsys.readouterr().err


def test_unwritable_output_folders_are_refused_up_front(cub_root, tmp_path, capsys, nothing_loads, monkeypatch):
    # Tests run as root, whom permission bits do not stop: make creating files fail the way a read-only mount does.
    import tempfile

    real_mkstemp, readonly = tempfile.mkstemp, tmp_path / "readonly"
    readonly.mkdir()

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == readonly:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(["train", *tiny_overrides(cub_root, readonly / "run")]) == 2
    err = capsys.readouterr().err
    assert f"the run folder {readonly / 'run'} is not writable (it would be created under {readonly}): read-only" in err
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", "cache.dir=" + str(readonly / "c"),
                                          "cache.views=2")]) == 2
    assert "the teacher cache folder (cache.dir)" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_folder_is_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            check_writable(ro / "run", "the run folder")
    finally:
        ro.chmod(0o755)


def test_eval_refuses_an_unwritable_out_before_evaluating(cub_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce", "trainer.max_epochs=1", "test=false")]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("pand.engine.run.load_checkpoint_student",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated before checking out")))
    capsys.readouterr()
    assert main(["eval", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"out={blocker / 'eval.json'}"]) == 2
    assert f"{blocker} is a file" in capsys.readouterr().err


def test_eval_results_survive_a_failed_write(cub_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(cub_root, run, "method=ce", "trainer.max_epochs=1", "test=false")]) == 0

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("pand.engine.run.atomic_write_json", disk_full)
    capsys.readouterr()
    assert main(["eval", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "no space left" in err and "'test_acc1':" in err


def test_gather_names_a_broken_summary(tmp_path, capsys):
    for name, text in (("good", json.dumps({"val_acc1": 0.5, "test_acc1": 0.4})), ("broken", '{"val_acc1": 0.')):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(text)
    assert main(["gather", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"run summary {tmp_path / 'runs' / 'broken' / 'summary.json'} is not valid JSON" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        ("prompts", "prompts.epochs=0", "prompts.epochs=0 is not allowed: expected an integer >= 1"),
        ("prompts", "prompts.class_token_position=left", "prompts.class_token_position='left' is not allowed"),
        ("features", "features.batch_size=0", "features.batch_size=0 is not allowed"),
        ("features", "features.splits=[train,holdout]", "features.splits=['train', 'holdout'] is not allowed"),
        ("features", "features.precision=FP16",
         "features.precision='FP16' is not allowed: expected one of 'fp32', 'bf16', 'fp16' (did you mean 'fp16'?)"),
        ("features", "features.precision_tolerance=-1", "features.precision_tolerance=-1 is not allowed"),
        ("prompts", "prompts.precision=half", "prompts.precision='half' is not allowed"),
        ("prompts", "prompts.precision_tolerance=null", "prompts.precision_tolerance=null is not allowed"),
    ],
)
def test_stage1_settings_are_refused_before_the_teacher_loads(cub_root, tmp_path, command, override, message,
                                                              monkeypatch, capsys):
    monkeypatch.setattr("pand.stage1.run.load_teacher",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher loaded")))
    args = [command, "data=cub", f"data.root={cub_root}", "data.num_classes=3", "teacher=tiny",
            f"features.dir={tmp_path / 'features'}", override]
    assert main(args) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- image sizes
def _size_config(size, blur=True, kernel=None):
    return to_plain(compose("train", [f"data.image_size={size}", f"data.resize_size={size}",
                                      f"data.augment.blur={str(blur).lower()}",
                                      f"data.augment.blur_kernel={'null' if kernel is None else kernel}"]))


@pytest.mark.parametrize(("size", "blur", "kernel"), [
    (1, True, None), (2, True, None), (1, False, None), (2, True, 3), (2, True, 5), (3, True, 5), (2, False, 5),
    (1, True, 1), (4, True, 4),
])
def test_the_image_size_rule_matches_what_the_training_views_can_be_made_at(size, blur, kernel):
    import torch
    from PIL import Image

    from pand.data.transforms import AugmentConfig, ReplayableAugment
    from pand.engine.config_checks import validate_train_settings

    try:
        validate_train_settings(_size_config(size, blur, kernel))
        refused = None
    except ConfigError as err:
        refused = str(err)
    try:
        augment = ReplayableAugment(AugmentConfig(image_size=size, resize_size=size, blur=blur, blur_kernel=kernel))
        view, _ = augment(Image.new("RGB", (7, 5), (10, 200, 30)), torch.Generator().manual_seed(0))
        works = view.shape == (3, size, size)
    except (ValueError, RuntimeError):
        works = False
    assert (refused is None) == works, refused
    assert refused is None or refused.count("\n") == 0  # one line under `pand train: error:`


def test_the_smallest_image_sizes_are_named_with_the_way_out(cub_root, tmp_path, capsys, nothing_loads):
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", "data.image_size=1", "data.resize_size=1")]) == 2
    assert capsys.readouterr().err == (
        "pand train: error: invalid training setting: data.image_size=1 is too small for the blur of the training "
        "views (data.augment.blur=true): its smallest kernel, 3 pixels, pads 1 pixel on each side by reflection, "
        "which needs data.image_size >= 2; use data.image_size >= 2 or data.augment.blur=false\n")
    with pytest.raises(ConfigError, match=r"data.augment.blur_kernel=5 is too large for data.image_size=2: the "
                                          r"blur pads 2 pixels on each side by reflection, which needs "
                                          r"data.image_size >= 3; use a kernel of at most 3 \(or null\)"):
        validate_train_config(_size_config(2, True, 5))
    with pytest.raises(ConfigError, match="data.augment.blur_kernel=4 is not allowed: expected an odd number"):
        validate_train_config(_size_config(8, True, 4))


def test_a_student_trains_at_the_smallest_image_size(cub_root, tmp_path):
    # 2 pixels with the blur on: the boundary the rule above lets through
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "run", "method=ce", "trainer.max_epochs=1", "test=false",
                                          "data.image_size=2", "data.resize_size=2")]) == 0


# ------------------------------------------------------------------------------------------------ eval options
def test_eval_options_are_checked_before_the_checkpoint_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pand.engine.run.evaluate", lambda *a, **k: pytest.fail("evaluated before checking options"))
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not read")
    (tmp_path / "a_folder").mkdir()
    cases = {
        "splits=[val,train]": "invalid option: splits=['val', 'train'] is not allowed: expected a non-empty list of "
                              "val and/or test, such as [val,test] or [test]",
        "splits=[val": "cannot read 'splits=[val': expected ',' or ']', but got '<stream end>'; check its brackets and "
                       "quotes (a list is written key=[a,b])",
        f"out={tmp_path / 'a_folder'}": f"invalid option: out='{tmp_path / 'a_folder'}' is a folder; expected a file "
                                        "name ending in .json",
        "out=results.txt": "invalid option: out='results.txt' is not allowed: the file name must end in .json",
        f"clip_benchmark_dir={ckpt}": f"invalid option: clip_benchmark_dir='{ckpt}' is a file; expected a folder "
                                      "(created if missing)",
        "data.batch_size=0": "invalid option: data.batch_size=0 is not allowed: expected an integer >= 1",
        "data=cub": "invalid option: data='cub' would replace the whole data section of the checkpoint's config; "
                    "override single settings (data.NAME=VALUE) instead",
        "+data.x=1": "unknown argument '+data.x=1': pand eval takes ckpt_path=, model=, splits=, out=, "
                     "clip_benchmark_dir= and overrides KEY=VALUE of settings of the checkpoint's config (such as "
                     "data.root=/new/place); usage: pand eval",
    }
    for option, message in cases.items():
        assert main(["eval", f"ckpt_path={ckpt}", option]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pand eval: error: {message}") and err.count("\n") == 1, err
    assert main(["eval", f"ckpt_path={tmp_path / 'missing.ckpt'}"]) == 2
    assert capsys.readouterr().err == (f"pand eval: error: invalid option: ckpt_path='{tmp_path / 'missing.ckpt'}': "
                                       "no such file; expected a checkpoint file\n")
