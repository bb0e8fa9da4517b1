"""pand: distil vision-language teachers into lightweight students.

    pand train [overrides...]            distil (Hydra overrides: data=cub method=vl2lite trainer.devices=4 ...)
    pand eval ckpt_path=PATH [overrides] evaluate a student checkpoint on val and test
    pand eval model=PATH [data.KEY=VALUE]  evaluate what pand export wrote (student.onnx, student.pt2) the same way
    pand predict ckpt_path=PATH images=FILE|DIR|GLOB [topk=5] [classes=[a,b]|classes_file=F] [out=preds.csv|.json]
                                         top-k classes of image files (open-vocabulary students: any class names);
                                         ckpt_path= (or model=) may also name an exported student.onnx / student.pt2
    pand config [overrides...]           print the composed training config
    pand features [overrides...]         PAND stage 1: store the teacher's image embeddings of train/val/test
    pand prompts [overrides...]          PAND stage 1: learn CoOp prompts on the stored embeddings
    pand sweep [overrides...]            one training run per combination of comma-separated values
                                         (also: pand train -m method.nlrd.weight=0,0.1,1.0), then a table and plot
    pand gather RUN_DIR... --out DIR     gather runs' summary.json into results.csv / .md / .png
    pand tsne CKPT... --labels a,b --out DIR   t-SNE of the students' test features, side by side
    pand quickstart [--out DIR] [--seeds N]     the whole pipeline offline on Fashion-MNIST (a few minutes, CPU)
    pand cache build cache.dir=DIR cache.views=K [overrides]   store K augmented views per training image with the
                                         teacher's embedding of each (torchrun --nproc_per_node=N splits the work)
    pand cache verify|export|import ...  check every row of a cache; write it as WebDataset tars (out=DIR) that
                                         another machine imports (src=DIR cache.dir=DIR) and trains from
    pand bench [--json] [--teacher ...]  ms per training step: student alone vs online teacher vs teacher cache
                                         (--latency: inference ms, images/s, params, FLOPs, student vs teacher)
    pand teacher fit [--out PATH]        re-fit the compact Fashion-MNIST CLIP teacher the quickstart ships with
    pand teacher text-tower ckpt_path=PATH out=DIR [width=..] [layers=..] [steps=..] ...
                                         a small text tower distilled from an open-vocabulary run's teacher, and how
                                         often the student's zero-shot predictions with it agree with the teacher's
    pand export ckpt_path=PATH format=onnx|torch_export|safetensors|open_clip|timm out=DIR [class_names=a,b,...]
                [text_tower=teacher|DIR]  the student alone, for use without pand, with student.json beside it
                [quantize=int8 calibration=N]  format=onnx: also student.int8.onnx (ONNX Runtime, calibrated)

    pand COMMAND --help                  a command's options; for train, config, features, prompts and cache also
                                         the config groups with their options, the settings and examples
    pand --version                       pand's version

Results (JSON; YAML for pand config) are the only output on stdout, logs and progress bars go to stderr:
    pand train ... | jq .test_acc1
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from pand.cli_help import (
    EVAL_USAGE,
    EXPORT_USAGE,
    HELP,
    PREDICT_USAGE,
    TEACHER_USAGE,
    TEXT_TOWER_USAGE,
    text_tower_help,
)
from pand.config_catalogue import CONFIGS_DIR
from pand.errors import ConfigError, Interrupted, PandError, close_matches, did_you_mean
from pand.interrupts import exit_status, signal_name, stop_on_signals
from pand.io import OUTPUT_ERRNOS
from pand.logs import setup_logging
from pand.rules import validate_export_options, validate_predict_options, validate_text_tower_options
from pand.version import __version__

# Nothing heavy at module level (no torch, Lightning, Hydra): `pand --help`, `pand COMMAND --help`, `pand --version`
# and the refusal of a misspelt command or override answer in a fraction of a second.

USAGE = __doc__

_HELP_FLAGS = ("-h", "--help")
_MULTIRUN_FLAGS = ("-m", "--multirun")


# ------------------------------------------------------------------------------------------------ stdout = results
_result_streams: list[TextIO] = []


def emit(text: str) -> None:
    """Write a command's result (its JSON, the YAML of ``pand config``) to the stdout that was current when the command
    started, while everything else the command prints (progress bars, library prints) goes to stderr."""
    out = _result_streams[-1] if _result_streams else sys.stdout
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


def _results_on_stdout(command: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
    """Run ``command`` with ``sys.stdout`` pointing at stderr; only :func:`emit` reaches the real stdout, so that
    ``pand train ... | jq .`` reads the summary alone (Lightning's progress bar writes to ``sys.stdout``)."""

    @functools.wraps(command)
    def run(args: Sequence[str]) -> int:
        _result_streams.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return command(args)
        finally:
            _result_streams.pop()

    return run


# ------------------------------------------------------------------------------------------------------- helpers
def _refuse_flags(command: str, args: Sequence[str], allowed: Sequence[str] = ()) -> None:
    bad = [a for a in args if a.startswith("-") and a not in allowed]
    if bad:
        takes = ", ".join([*allowed, "-h/--help"])
        raise ConfigError(f"unknown option {bad[0]!r}; pand {command} takes overrides KEY=VALUE and {takes} "
                          f"(pand {command} --help)")


def _compose_train(args: Sequence[str]) -> dict[str, Any]:
    """The resolved ``train`` config for ``args``; nothing heavy is imported (Hydra, OmegaConf only)."""
    from pand.config import compose, to_plain

    return to_plain(compose("train", list(args)))


def _read_values(args: Sequence[str]) -> dict:
    """``key=value`` arguments as OmegaConf reads them (``k=[a,b]`` a list, ``k=3`` a number, ``a.b=1`` nested); one
    it cannot read (``k=[a,b``, an unclosed quote) is refused with its text and the reason."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = OmegaConf.create()
    for arg in args:  # one at a time, as OmegaConf.from_dotlist does, so that an error names its argument
        try:
            values.merge_with_dotlist([arg])
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            reason = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"cannot read {arg!r}: {reason}; check its brackets and quotes (a list is written "
                              "key=[a,b])") from None
    return OmegaConf.to_container(values)


_EVAL_KEYS = ("ckpt_path", "model", "splits", "out", "clip_benchmark_dir")
_SETTING = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _split_eval_args(args: Sequence[str]) -> tuple[dict, dict]:
    """``pand eval`` options (ckpt_path or model, splits, out, clip_benchmark_dir; defaults from eval.yaml) vs
    overrides of the checkpoint's config; nothing heavy is imported (OmegaConf only)."""
    from omegaconf import OmegaConf

    from pand.engine.config_checks import EVAL_SPLITS

    own_args = [a for a in args if a.partition("=")[0] in _EVAL_KEYS]
    overrides = [a for a in args if a not in own_args]
    bad = [a for a in overrides if not _SETTING.match(a)]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]!r}: pand eval takes {', '.join(f'{k}=' for k in _EVAL_KEYS)} "
                          "and overrides KEY=VALUE of settings of the checkpoint's config (such as "
                          f"data.root=/new/place); usage: {EVAL_USAGE}")
    own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONFIGS_DIR / "eval.yaml")).items()
           if k != "ckpt_path"}  # ??? in eval.yaml: cmd_eval asks for it
    own.update(_key_value_options("eval", own_args, _EVAL_KEYS, (), EVAL_USAGE,
                                  paths=("ckpt_path", "model", "out", "clip_benchmark_dir")))
    if own.get("splits") in EVAL_SPLITS:  # splits=test
        own["splits"] = [own["splits"]]
    return own, _read_values(overrides)


def _key_value_options(command: str, args: Sequence[str], allowed: Sequence[str], required: Sequence[str],
                       usage: str, paths: Sequence[str] = ()) -> dict:
    """The ``key=value`` options of a command that takes no config overrides (lists as ``key=[a,b]``); an unknown
    key or a missing required one is refused with the usage line. The ``paths`` keep their text as typed (YAML would
    read ``out=0x10`` as 16 and ``images=*.jpg`` as an alias); empty or ``null``, they are not given."""

    bad = [a for a in args if a.partition("=")[0] not in allowed or "=" not in a]
    if bad:
        key = bad[0].partition("=")[0]
        hint = did_you_mean([f"{m}=..." for m in close_matches(key, allowed)])
        raise ConfigError(f"unknown argument {bad[0]!r}{hint or ';'} pand {command} takes {', '.join(allowed)}; "
                          f"usage: {usage}")
    opts = _read_values([a for a in args if a.partition("=")[0] not in paths])
    for arg in args:
        key, _, value = arg.partition("=")
        if key in paths:
            opts[key] = None if value in ("", "null") else value
    missing = [k for k in required if opts.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"pand {command} needs {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return opts


# ------------------------------------------------------------------------------------------------------ commands
def cmd_train(args: Sequence[str]) -> int:
    if any(a in _MULTIRUN_FLAGS for a in args):
        return cmd_sweep([a for a in args if a not in _MULTIRUN_FLAGS])
    return _train(args)


@_results_on_stdout
def _train(args: Sequence[str]) -> int:
    from pand.engine.config_checks import validate_train_settings

    _refuse_flags("train", args, _MULTIRUN_FLAGS)
    config = _compose_train(args)
    validate_train_settings(config)  # a value out of range is refused before torch is imported
    from pand.engine.run import train
    from pand.export import ship_int8

    emit(json.dumps(ship_int8(train(config), config), indent=2))
    return 0


_PREDICT_KEYS = ("ckpt_path", "model", "images", "topk", "classes", "classes_file", "out", "batch_size",
                 "num_workers", "device")
_PREDICT_PATHS = ("ckpt_path", "images", "classes_file", "out")


@_results_on_stdout
def cmd_predict(args: Sequence[str]) -> int:
    # model= is another name for ckpt_path=: a checkpoint or an exported model, told apart by pand.deploy
    if any(a.startswith("model=") for a in args) and any(a.startswith("ckpt_path=") for a in args):
        raise ConfigError(f"give ckpt_path= or model= (two names for the same option), not both; usage: "
                          f"{PREDICT_USAGE}")
    args = [f"ckpt_path={a[len('model='):]}" if a.startswith("model=") else a for a in args]
    opts = _key_value_options("predict", args, _PREDICT_KEYS, ("ckpt_path", "images"), PREDICT_USAGE,
                              paths=_PREDICT_PATHS)
    validate_predict_options(opts)  # before torch is imported (but for a GPU device) and before the model is loaded
    from pand.predict import format_predictions, predict

    numbers = {k: int(opts[k]) for k in ("topk", "batch_size", "num_workers") if k in opts}
    rows = predict(opts["ckpt_path"], opts["images"], classes=opts.get("classes"),
                   classes_file=opts.get("classes_file"), out=opts.get("out"), device=opts.get("device") or "auto",
                   **numbers)
    if opts.get("out"):
        print(format_predictions(rows), file=sys.stderr)
        emit(json.dumps({"images": len(rows), "out": str(opts["out"])}, indent=2))
    else:
        emit(json.dumps(rows, indent=2))
    return 0


@_results_on_stdout
def cmd_eval(args: Sequence[str]) -> int:
    from pand.engine.config_checks import validate_eval_options

    _refuse_flags("eval", args)

    def given(key: str) -> bool:
        values = [a.partition("=")[2].strip() for a in args if a.startswith(f"{key}=")]
        return bool(values) and values[-1] not in ("", "null", "None", "???")

    if given("ckpt_path") and given("model"):
        raise ConfigError(f"give ckpt_path= (a checkpoint) or model= (an exported model), not both; usage: "
                          f"{EVAL_USAGE}")
    if not given("ckpt_path") and not given("model"):
        raise ConfigError(f"pand eval needs ckpt_path=PATH (a checkpoint such as runs/<run>/checkpoints/best.ckpt) "
                          f"or model=PATH (a student.onnx or student.pt2 that pand export wrote); usage: {EVAL_USAGE}")
    own, overrides = _split_eval_args(args)
    if given("model"):
        return _eval_exported(own, overrides)
    validate_eval_options(own["splits"], own.get("out"), ckpt_path=own["ckpt_path"], overrides=overrides,
                          clip_benchmark_dir=own.get("clip_benchmark_dir"))
    from pand.engine.run import evaluate

    results = evaluate(own["ckpt_path"], overrides, splits=tuple(own["splits"]), out=own.get("out"),
                       clip_benchmark_dir=own.get("clip_benchmark_dir"))
    emit(json.dumps(results, indent=2))
    return 0


def _eval_exported(own: dict, overrides: dict) -> int:
    from pand.engine.config_checks import validate_eval_options

    if own.get("clip_benchmark_dir") is not None:
        raise ConfigError("clip_benchmark_dir= needs the checkpoint of an open-vocabulary student (pand eval "
                          "ckpt_path=...); an exported model is scored on its exported classes only")
    if not os.path.exists(os.path.expanduser(own["model"])):
        raise ConfigError(f"model={own['model']}: no such file or folder; expected a student.onnx or student.pt2 "
                          "written by pand export (or its folder)")
    other = sorted(set(overrides) - {"data"})
    if other:
        raise ConfigError(f"pand eval model=... takes data.KEY=VALUE overrides only, not {other[0]}.*: an exported "
                          "model keeps nothing else of its run's config (it runs on the CPU in float32)")
    validate_eval_options(own["splits"], own.get("out"), overrides=overrides)
    from pand.engine.run import evaluate_exported

    emit(json.dumps(evaluate_exported(own["model"], overrides, splits=tuple(own["splits"]), out=own.get("out")),
                    indent=2))
    return 0


@_results_on_stdout
def cmd_config(args: Sequence[str]) -> int:
    from omegaconf import OmegaConf

    from pand.config import compose, to_plain

    resolve = "--resolve" in args
    overrides = [a for a in args if a != "--resolve"]
    _refuse_flags("config", overrides, ("--resolve",))
    cfg = compose("train", overrides)
    emit(OmegaConf.to_yaml(to_plain(cfg) if resolve else cfg))
    return 0


def _stage1_config(command: str, args: Sequence[str], *, writes_prompts: bool) -> dict[str, Any]:
    from pand.stage1.checks import validate_coop_config

    _refuse_flags(command, args)
    config = _compose_train(args)
    validate_coop_config(config, writes_prompts=writes_prompts)  # before the engine (torch) is imported
    return config


@_results_on_stdout
def cmd_features(args: Sequence[str]) -> int:
    config = _stage1_config("features", args, writes_prompts=False)
    from pand.stage1.run import features_agreement, run_features

    stored = {}
    features = run_features(config)
    agreement = features_agreement(config)  # only low-precision files have one
    for split, (embeds, _) in features.items():
        path = f"{config['features']['dir']}/{split}.safetensors"
        print(f"{split}: {tuple(embeds.shape)} -> {path}", file=sys.stderr)
        stored[split] = {"shape": list(embeds.shape), "file": path}
        if split in agreement:
            stored[split].update(precision=agreement[split]["precision"], agreement=agreement[split])
    emit(json.dumps(stored, indent=2))
    return 0


@_results_on_stdout
def cmd_prompts(args: Sequence[str]) -> int:
    config = _stage1_config("prompts", args, writes_prompts=True)
    from pand.stage1.run import run_prompts

    summary = run_prompts(config)
    print(
        f"teacher zero-shot: val {summary['zero_shot_val_acc']:.4f} test {summary['zero_shot_test_acc']:.4f}\n"
        f"teacher CoOp:      val {summary['coop_val_acc']:.4f} test {summary['coop_test_acc']:.4f} "
        f"(best epoch {summary['best_epoch']})\n"
        f"learned text features: {summary['text_features']}\n"
        f"stage 2: pand train method=pand teacher.text_features={summary['text_features']} ...",
        file=sys.stderr,
    )
    emit(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_sweep(args: Sequence[str]) -> int:
    from pand.analysis.sweep import main_sweep

    return main_sweep(list(args))


def cmd_gather(args: Sequence[str]) -> int:
    from pand.analysis.sweep import main_gather

    return main_gather(list(args))


def cmd_tsne(args: Sequence[str]) -> int:
    from pand.analysis.tsne import main_tsne

    return main_tsne(list(args))


def cmd_quickstart(args: Sequence[str]) -> int:
    from pand.quickstart import main_quickstart

    return main_quickstart(list(args))


def _subcommand(command: str, args: Sequence[str], subcommands: Sequence[str], usage: str) -> None:
    """Refuse a missing or misspelt subcommand (``pand cache biuld``) with the closest one and the usage."""

    if not args:
        raise ConfigError(f"pand {command} needs a subcommand ({', '.join(subcommands)}); usage: {usage}")
    if args[0] not in subcommands:
        hint = did_you_mean([f"pand {command} {m}" for m in close_matches(args[0], subcommands)])
        raise ConfigError(f"unknown subcommand {args[0]!r}{hint or ';'} usage: {usage}")


CACHE_USAGE = ("pand cache build cache.dir=DIR cache.views=K [overrides...] | pand cache verify cache.dir=DIR | "
               "pand cache export cache.dir=DIR out=DIR [overrides...] | pand cache import src=DIR cache.dir=DIR")


def cmd_cache(args: Sequence[str]) -> int:
    _subcommand("cache", args, ("build", "verify", "export", "import"), CACHE_USAGE)
    return {"build": _cache_build, "verify": _cache_verify, "export": _cache_export,
            "import": _cache_import}[args[0]](args[1:])


@_results_on_stdout
def _cache_verify(args: Sequence[str]) -> int:
    opts = _key_value_options("cache verify", args, ("cache.dir",), ("cache.dir",), CACHE_USAGE, paths=("cache.dir",))
    from pand.cache.teacher import TeacherCache

    cache = TeacherCache.open(opts["cache.dir"], verify="full")
    m = cache.meta
    print(f"teacher cache verified: {cache.folder} (every row of {m['num_shards']} shards matches its digest)",
          file=sys.stderr)
    emit(json.dumps({"cache": str(cache.folder), "images": m["num_samples"], "views": m["views"],
                     "shards": m["num_shards"], "outputs": cache.describe_outputs(), "verified": "full"}, indent=2))
    return 0


@_results_on_stdout
def _cache_export(args: Sequence[str]) -> int:
    _refuse_flags("cache export", args)
    out = [a for a in args if a.startswith("out=")]
    if len(out) != 1 or not out[0][4:]:
        raise ConfigError(f"pand cache export needs out=DIR (a new folder for the tars); usage: {CACHE_USAGE}")
    config = _compose_train([a for a in args if not a.startswith("out=")])
    from pand.engine.run import export_teacher_cache

    exported = export_teacher_cache(config, out[0][4:])
    tars = exported["export"]["tars"]
    print(f"teacher cache exported: {len(tars)} WebDataset tars of {exported['num_samples']} images in "
          f"{out[0][4:]}", file=sys.stderr)
    emit(json.dumps({"out": out[0][4:], "tars": len(tars), "images": exported["num_samples"]}, indent=2))
    return 0


@_results_on_stdout
def _cache_import(args: Sequence[str]) -> int:
    opts = _key_value_options("cache import", args, ("src", "cache.dir"), ("src", "cache.dir"), CACHE_USAGE,
                              paths=("src", "cache.dir"))
    from pand.cache.teacher.portable import import_cache

    meta = import_cache(opts["src"], opts["cache.dir"])
    print(f"teacher cache imported: {opts['cache.dir']} ({meta['num_samples']} images, {meta['num_shards']} shards, "
          "identical to the exported cache)", file=sys.stderr)
    emit(json.dumps({"cache": opts["cache.dir"], "images": meta["num_samples"], "shards": meta["num_shards"]},
                    indent=2))
    return 0


@_results_on_stdout
def _cache_build(args: Sequence[str]) -> int:
    from pand.engine.config_checks import validate_train_settings

    _refuse_flags("cache", args)
    config = _compose_train(args)
    validate_train_settings(config)
    from pand.engine.run import build_cache

    cache = build_cache(config)
    if cache is not None:
        m = cache.meta
        print(f"teacher cache complete: {cache.folder} ({m['num_samples']} images x {m['views']} views, "
              f"{cache.describe_outputs()})", file=sys.stderr)
        result = {"cache": str(cache.folder), "images": m["num_samples"], "views": m["views"],
                  "outputs": cache.describe_outputs()}
        if m.get("precision"):  # recorded by low-precision caches only
            result.update(precision=m["precision"], agreement=m.get("agreement"))
        emit(json.dumps(result, indent=2))
    return 0


def cmd_bench(args: Sequence[str]) -> int:
    from pand.bench import main_bench

    return main_bench(list(args))


def cmd_teacher(args: Sequence[str]) -> int:
    _subcommand("teacher", args, ("fit", "text-tower"), TEACHER_USAGE)
    if args[0] == "text-tower":
        return _text_tower(args[1:])
    from pand.teachers.standin_fit import main_fit

    return main_fit(list(args[1:]))


_TEXT_TOWER_KEYS = ("ckpt_path", "out", "width", "heads", "layers", "steps", "batch_size", "lr", "corpus", "seed",
                    "device", "warm_start", "contrastive_weight", "temperature")
_TEXT_TOWER_PATHS = ("ckpt_path", "out", "corpus")


@_results_on_stdout
def _text_tower(args: Sequence[str]) -> int:
    # data.KEY=VALUE changes the run's data section (the data moved); the rest are the command's own options
    data_args = [a for a in args if a.startswith("data.") and "=" in a]
    opts = _key_value_options("teacher text-tower", [a for a in args if a not in data_args], _TEXT_TOWER_KEYS,
                              ("ckpt_path", "out"), TEXT_TOWER_USAGE, paths=_TEXT_TOWER_PATHS)
    validate_text_tower_options(opts)  # before torch is imported (but for a GPU device) and the checkpoint loaded
    from omegaconf import OmegaConf

    from pand.text_tower_fit import fit_text_tower

    ckpt, out = opts.pop("ckpt_path"), opts.pop("out")
    data = OmegaConf.to_container(OmegaConf.from_dotlist(data_args))["data"] if data_args else None
    emit(json.dumps(fit_text_tower(ckpt, out, data_overrides=data, **opts), indent=2))
    return 0


_EXPORT_KEYS = ("ckpt_path", "format", "out", "class_names", "text_tower", "quantize", "calibration",
                "calibration_method")


@_results_on_stdout
def cmd_export(args: Sequence[str]) -> int:
    opts = _key_value_options("export", args, _EXPORT_KEYS, ("ckpt_path", "format", "out"), EXPORT_USAGE,
                              paths=("ckpt_path", "out", "text_tower"))
    names = validate_export_options(opts)  # before torch is imported and the checkpoint loaded
    from pand.export import export_student

    result = export_student(opts["ckpt_path"], opts["format"], opts["out"], class_names=names,
                            text_tower=opts.get("text_tower") or "teacher", quantize=opts.get("quantize"),
                            **{k: opts[k] for k in ("calibration", "calibration_method") if opts.get(k) is not None})
    vocab = result["student"].get("open_vocabulary")
    if vocab is not None:
        # A vocabulary of thousands of rows belongs in student.json, not on the terminal.
        rows, dim = vocab["text_matrix_shape"]
        vocab = {**vocab, "text_matrix": f"<{rows} x {dim}, in {result['files'][-1]}>"}
        result = {**result, "student": {**result["student"], "open_vocabulary": vocab}}
    emit(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------- main
COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "config": cmd_config,
    "features": cmd_features,
    "prompts": cmd_prompts,
    "sweep": cmd_sweep,
    "gather": cmd_gather,
    "tsne": cmd_tsne,
    "quickstart": cmd_quickstart,
    "cache": cmd_cache,
    "bench": cmd_bench,
    "teacher": cmd_teacher,
    "export": cmd_export,
}


def _own_help(command: str, args: Sequence[str]) -> bool:
    """Whether ``pand COMMAND args`` asks for help that pand prints itself (the argparse commands print their own:
    sweep, gather, tsne, quickstart, bench, teacher fit)."""

    if command not in HELP:
        return False
    if command == "teacher":  # `pand teacher fit --help` is fit's own (argparse) help; text-tower's is pand's
        return bool(args) and (args[0] in _HELP_FLAGS or (
            args[0] == "text-tower" and any(a in _HELP_FLAGS for a in args[1:])))
    return any(a in _HELP_FLAGS for a in args)


def _print_help(command: str | None, args: Sequence[str] = ()) -> int:
    if command is None:
        print(USAGE)
    elif command == "teacher" and args[:1] == ["text-tower"]:
        sys.stdout.write(text_tower_help())
    elif command in HELP:
        sys.stdout.write(HELP[command]())
    else:
        return main([command, "--help"])
    return 0


def _unknown_command(command: str) -> int:
    hint = did_you_mean([f"pand {m}" for m in close_matches(command, COMMANDS)])
    print(f"pand: error: unknown command {command!r}{hint}\n  commands: {', '.join(COMMANDS)} "
          "(pand --help describes them)", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in _HELP_FLAGS:
        return _print_help(None)
    if argv[0] in ("-V", "--version"):
        print(f"pand {__version__}")
        return 0
    if argv[0] == "help":  # pand help [COMMAND]
        if len(argv) > 1 and argv[1] not in COMMANDS:
            return _unknown_command(argv[1])
        return _print_help(argv[1] if len(argv) > 1 else None)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        return _unknown_command(command)
    if _own_help(command, args):
        return _print_help(command, list(args))
    setup_logging()
    try:
        with stop_on_signals():
            return COMMANDS[command](args)
    except Interrupted as stop:
        return _interrupted(command, args, stop)
    except KeyboardInterrupt:  # SIGINT before pand's handler was installed, or from a library's own handler
        return _interrupted(command, args, Interrupted(signal.SIGINT))
    except PandError as err:
        return _fail(command, str(err))
    except OSError as err:
        # A full disk, a read-only or forbidden folder: the user's environment, not a bug; name the file.
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        return _fail(command, f"{OUTPUT_ERRNOS[err.errno]}{where} ({err.strerror or err})")
    except SystemExit as exit_:
        if type(exit_).__name__ == "SIGTERMException":
            # Lightning's way of ending on SIGTERM (code None, which would read as success) where its handler ran
            return _interrupted(command, args, Interrupted(signal.SIGTERM))
        # argparse (sweep, gather, tsne, quickstart, bench, teacher fit): --help (0), already printed; returned, so
        # that main() called from Python gets the status like every other command (usage errors are ConfigErrors).
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        raise


def _interrupted(command: str, args: Sequence[str], stop: Interrupted) -> int:
    """One line for a command a signal stopped: what was saved and the command that continues; exit 128 + signal."""
    saved = f"saved {stop.saved}" if stop.saved else "nothing was saved"
    if stop.resume:
        how = f"continue with: {stop.resume}"
    elif stop.checkpoint and command == "train" and not any(a in _MULTIRUN_FLAGS for a in args):
        kept = [a for a in args if not a.startswith("ckpt_path=")]
        how = f"resume with: {shlex.join(['pand', 'train', *kept, f'ckpt_path={stop.checkpoint}'])}"
    else:
        how = f"run it again to continue: {shlex.join(['pand', command, *args])}"
    print(f"pand {command}: interrupted by {signal_name(stop.signum)}; {saved}; {how}", file=sys.stderr)
    return exit_status(stop.signum)


def _fail(command: str, message: str) -> int:
    """One clear message and exit status 2 for bad input; unexpected errors keep their traceback instead."""
    print(f"pand {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
