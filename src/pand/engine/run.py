"""``pand train`` and ``pand eval``: build everything from a config, run Lightning, write the run folder.

A run folder holds ``config.yaml`` (resolved), ``metrics.csv``, ``checkpoints/{best,last}.ckpt`` and ``summary.json``.
Every setting is validated (:mod:`pand.engine.config_checks`) and a resumed checkpoint verified (:mod:`pand.engine.checkpoints`)
before any model or data is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from pand.cache.teacher import TeacherCache
from pand.cache.teacher.portable import export_cache
from pand.checkpoint_files import read_checkpoint, stored_config, student_state
from pand.config import teacher_cache_settings, with_data_overrides
from pand.data.assembly import UNLABELLED_SPLIT
from pand.data.mixing import BatchMixer
from pand.distillers import Distiller, build_distiller, get_distiller_class
from pand.engine.builders import build_callbacks, build_loggers, close_loggers
from pand.engine.callbacks import ParameterSummary, QuantizationSchedule
from pand.engine.checkpoints import (
    AtomicCheckpointIO,
    RunCheckpoints,
    check_resume_config,
    check_resume_record,
    run_record,
)
from pand.engine.config_checks import validate_eval_options, validate_train_config
from pand.engine.data import PandDataModule
from pand.engine.launch import all_ok, join_launch, launched_ranks
from pand.engine.module import DistillationModule
from pand.engine.open_vocab_eval import format_report, open_vocab_report, write_clip_benchmark
from pand.engine.teacher_side import (
    build_teacher_side,
    label_val_with_teacher,
    live_source,
    open_or_build_cache,
)
from pand.errors import ConfigError, Interrupted, MismatchError, OutputError
from pand.interrupts import signal_name
from pand.io import (
    OUTPUT_ERRNOS,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    file_sha256,
    mark_output_folder,
)
from pand.locks import FolderLock, remove_if_unused
from pand.provenance import software_record
from pand.students import build_student
from pand.students.checkpoint import load_checkpoint_student
from pand.students.exported import exported_model_file, load_exported
from pand.students.open_vocab import OpenVocabStudent
from pand.students.quantize import prepare_qat
from pand.teachers.registry import load_teacher

log = logging.getLogger("pand")

# Set by rank 0 so that the processes the DDP launcher starts write into the same run folder.
_RUN_DIR_ENV = "PAND_RUN_DIR"


def is_first_process() -> bool:
    """Whether this is the process that owns the run folder: global rank 0 of a distributed launch (torchrun, SLURM,
    Lightning's own launcher, which starts the other local ranks with LOCAL_RANK set)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key) not in (None, ""):
            return os.environ[key] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def resolve_run_dir(config: Mapping[str, Any]) -> Path:
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(_RUN_DIR_ENV):
        return Path(os.environ[_RUN_DIR_ENV])
    if config.get("run_dir"):
        return Path(config["run_dir"])
    if config.get("ckpt_path"):
        # Resuming continues in the run folder the checkpoint belongs to.
        ckpt = Path(config["ckpt_path"])
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{config['data']['name']}-{config['method']['name']}-{config['student']['name']}-{stamp}"
    return Path(config["paths"]["runs_dir"]) / name


def build_student_from(config: Mapping[str, Any], num_classes: int):
    s = config["student"]
    # Built for the run's input size (timm ViTs, Mixers, Swins take img_size); methods that attach heads to the
    # student's stages size them with a dry run at it (student.input_size).
    # init_from replaces every weight of the student: the library's pretrained ones are not downloaded for nothing
    start = bool(config.get("init_from"))
    return build_student(
        s["name"], num_classes, source=s.get("source", "auto"),
        pretrained=False if start else _pretrained(s.get("pretrained", True)),
        weights=None if start else s.get("weights"), image_size=int(config["data"]["image_size"]),
        kwargs=s.get("kwargs"),
    )


def _pretrained(value: Any) -> bool | str:
    """``student.pretrained``: true / false, or the name of a torchvision model's weights (``IMAGENET1K_V1``)."""
    return value if isinstance(value, str) else bool(value)


def build_training(config: Mapping[str, Any], run_dir: Path | None = None
                   ) -> tuple[PandDataModule, DistillationModule]:
    """Data module and Lightning module for a resolved training config.

    The teacher side (a live teacher, or a teacher cache that spares loading it) is whatever the method reads.
    """
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    classes = data.classes
    data.check_outputs_outside({"run_dir": run_dir, "cache.dir": (config.get("cache") or {}).get("dir")})
    method_cls = get_distiller_class(config["method"]["name"])
    context, source = build_teacher_side(config, data, method_cls)
    if data.label_free:
        label_val_with_teacher(config, data, context, source)
    student = build_student_from(config, len(classes))
    _prepare_quantization(config, student)  # before the distiller taps the student's stages
    distiller = build_distiller(config["method"], student, len(classes), context)
    _start_from(config, distiller)
    mixer = BatchMixer.from_config(config.get("mixing"), len(classes), seed=int(config["seed"]))
    module = DistillationModule(distiller, source, optim=config["optim"], scheduler=config.get("scheduler"),
                                config=config, mixer=mixer)
    return data, module


def _prepare_quantization(config: Mapping[str, Any], student) -> None:
    """``quantize=qat``: fake-quantize the student's layers (:mod:`pand.students.quantize`)."""
    if (config.get("quantize") or {}).get("name") != "qat":
        return
    quantized = prepare_qat(student)
    if is_first_process():
        log.info("quantization-aware training: %d layers fake-quantized (int8 weights per channel, uint8 inputs)%s",
                 len(quantized.quantized), f"; left in float: {', '.join(quantized.float_layers)}"
                 if quantized.float_layers else "")


def _start_from(config: Mapping[str, Any], distiller: Distiller) -> None:
    """``init_from``: the student of a pand checkpoint starts this run (a fine-tune, a quantization-aware one)."""
    path = config.get("init_from")
    if not path:
        return
    if config.get("ckpt_path"):
        if is_first_process():
            log.info("init_from=%s is not read: the run resumes from ckpt_path, which holds its weights", path)
        return
    ckpt = read_checkpoint(path)
    state = student_state(ckpt)
    stored = stored_config(ckpt, path)["student"]
    if stored.get("name") != config["student"]["name"]:
        raise MismatchError(f"init_from={path} holds a {stored.get('name')} student; this run trains a "
                            f"{config['student']['name']}")
    try:
        distiller.student.load_state_dict(state)
    except RuntimeError as err:
        raise MismatchError(f"the student of init_from={path} does not fit this run's student (another "
                            f"architecture, classes or method head): {str(err).splitlines()[0]}") from None
    if is_first_process():
        log.info("the student starts from the one of %s", path)


def build_trainer(
    config: Mapping[str, Any], run_dir: Path, record: Mapping[str, Any], resume_step: int | None = None
) -> tuple[L.Trainer, RunCheckpoints]:
    kwargs = {k: v for k, v in dict(config["trainer"]).items() if v is not None}
    checkpoints = RunCheckpoints(
        run_dir / "checkpoints", record, every_n_steps=int((config.get("checkpoint") or {}).get("every_n_steps") or 0)
    )
    loggers = build_loggers(config.get("logger"), run_dir, resume_step)
    # pand's checkpointing runs last, after any callback that changes the weights it saves (the EMA's average).
    callbacks = [*build_callbacks(config.get("callbacks"), has_logger=bool(loggers)), ParameterSummary(), checkpoints]
    q = config.get("quantize") or {}
    if q.get("name") == "qat":
        callbacks.insert(0, QuantizationSchedule(q.get("start_epoch", 0), q.get("freeze_bn_epochs", 0)))
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # RunCheckpoints writes them; Lightning's default would add epoch=*.ckpt files
        use_distributed_sampler=False,
        **kwargs,
    )
    return trainer, checkpoints


def train(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train, select on val, test once; returns (and on rank 0 writes) the run summary."""
    config = dict(config)
    validate_train_config(config)
    L.seed_everything(int(config["seed"]), workers=True, verbose=False)
    run_dir = resolve_run_dir(config).resolve()
    os.environ[_RUN_DIR_ENV] = str(run_dir)
    try:
        return _train(config, run_dir)
    finally:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            os.environ.pop(_RUN_DIR_ENV, None)


def _train(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    if not is_first_process():
        return _train_locked(config, run_dir)
    created = not run_dir.exists()
    # One owner per run folder, taken before the folder is looked at: a second run started in it (or a resume of it
    # while it still trains) is refused with the owner's pid, instead of both writing checkpoints over each other.
    lock = FolderLock(run_dir, "run folder").acquire()
    try:
        return _train_locked(config, run_dir)
    finally:
        lock.release()
        if created:  # a run refused while its data or teacher loaded leaves no folder behind
            remove_if_unused(run_dir)


def _train_locked(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    ckpt_path = config.get("ckpt_path")
    resume = None
    if ckpt_path:
        resume = check_resume_config(ckpt_path, config)
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(
            f"run folder {run_dir} already holds checkpoints; resume with "
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} or choose another run_dir"
        )
    if is_first_process():
        log.info("run folder: %s", run_dir)  # before the data and the teacher load, which may take minutes
    data, module = build_training(config, run_dir)
    record = run_record(run_dir, data.splits, module.distiller.context)
    if resume is not None:
        check_resume_record(ckpt_path, resume["record"], record)
    trainer, checkpoints = build_trainer(config, run_dir, record, resume["global_step"] if resume else None)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark_output_folder(run_dir, "run")
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    software = software_record()
    start = time.time()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except Interrupted as stop:
        raise _interrupted_training(stop, trainer, run_dir, checkpoints, config) from None
    train_seconds = time.time() - start
    best = checkpoints.best_path or checkpoints.last_path
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": config["data"]["name"],
        "method": config["method"]["name"],
        "student": config["student"]["name"],
        "teacher": config["teacher"]["model"] if module.distiller.uses_teacher else None,
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "best_checkpoint": str(best),
        "best_epoch": checkpoints.best_epoch,
        "val_acc1": _as_float(checkpoints.best_score),
        "test_acc1": None,
        "labelled_images": len(data.splits["train"]),
        "unlabelled_images": len(data.splits.get(UNLABELLED_SPLIT, ())),
        **software,
    }
    shared = {pair: n for pair, n in data.overlap.items() if n}
    if shared or config["data"].get("allow_overlap"):
        # images found in two splits by content (data.allow_overlap=true lets a run go on with them): on record
        summary["overlap"] = {"allowed": bool(config["data"].get("allow_overlap")), "images": shared}
    if data.label_free:
        summary["val_labels"] = "teacher"  # val_acc1 is the student's agreement with the teacher's top-1
    if config.get("test", True):
        # Training is done and selected: write that down first, so a failure while testing loses nothing.
        _write_summary(trainer, run_dir, {**summary, "status": "testing"})
        try:
            results = trainer.test(module, datamodule=data, ckpt_path=str(best), weights_only=True, verbose=False)
        except Interrupted as stop:
            _write_summary(trainer, run_dir, {**summary, "status": "test interrupted",
                                              "signal": signal_name(stop.signum)})
            raise stop.with_saved(f"the trained run in {run_dir} (selected checkpoint {best}); only its test was "
                                  "cut short", resume=f"pand eval ckpt_path={best} splits=[test]") from None
        except Exception as err:
            _write_summary(trainer, run_dir, {**summary, "status": "test failed", "test_error": str(err)})
            raise
        summary["test_acc1"] = _as_float(results[0].get("test/acc1")) if results else None
        summary["test_acc5"] = _as_float(results[0].get("test/acc5")) if results else None
        if module.distiller.embeds_images and trainer.is_global_zero:
            summary["open_vocab"] = _open_vocab(config, data, module, run_dir, best)
    summary["status"] = "done"
    summary["total_seconds"] = round(time.time() - start, 2)
    _write_summary(trainer, run_dir, summary)
    close_loggers(trainer.loggers)
    return summary


def _interrupted_training(stop: Interrupted, trainer: L.Trainer, run_dir: Path, checkpoints: RunCheckpoints,
                          config: Mapping[str, Any]) -> Interrupted:
    """The interruption of ``fit``, naming the checkpoint a resume continues from, with a summary.json that says the
    run did not finish (a scheduler or script reading it must not take the run for done)."""
    last = checkpoints.last_path
    if stop.checkpoint is None and last.is_file():
        stop = stop.with_saved(f"{last} (the last checkpoint written before {signal_name(stop.signum)})",
                               checkpoint=str(last))
    elif stop.checkpoint is None:
        stop = stop.with_saved("nothing: no checkpoint had been written yet")
    _write_summary(trainer, run_dir, {
        "run_dir": str(run_dir), "status": "interrupted", "signal": signal_name(stop.signum),
        "epochs": trainer.current_epoch, "global_step": trainer.global_step,
        "last_checkpoint": stop.checkpoint, "data": config["data"]["name"], "method": config["method"]["name"],
        "student": config["student"]["name"],
    })
    return stop


def _open_vocab(config: Mapping[str, Any], data: PandDataModule, module: DistillationModule,
               run_dir: Path, weights: Path) -> dict[str, Any]:
    """Base / novel / HM top-1 and retrieval of the (best-on-val) student, whose weights come from ``weights``, and
    of the teacher's zero-shot classifier; the teacher is loaded for this if the run trained from its cache."""

    live = live_source(module.teacher_source)
    report = open_vocab_report(module.distiller.student, data, config, live.teacher if live is not None else None,
                               load_teacher=lambda: load_teacher(config), student_weights=weights)
    atomic_write_json(run_dir / "open_vocab.json", report)
    log.info("%s", format_report(report))
    return {k: v for k, v in report.items() if k in ("student", "teacher", "class_split")}


def _write_summary(trainer: L.Trainer, run_dir: Path, summary: Mapping[str, Any]) -> None:
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", dict(summary))


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def evaluate(ckpt_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
             splits=("val", "test"), out: str | None = None,
             clip_benchmark_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the student of a checkpoint on the given splits (top-1 / top-5 on its classes).

    A closed-set student needs no teacher. An open-vocabulary one (``method=openvocab``) also gets the report of the
    end of its training run (:func:`~pand.engine.open_vocab_eval.open_vocab_report`, under ``open_vocab``), for which
    the run's teacher is loaded: its text tower turns the class names into the classifier, its image tower is the
    reference. Its records are written as clip_benchmark's result files into ``clip_benchmark_dir`` (default: beside
    the results, ``best.clip_benchmark/`` for ``best.eval.json``).
    """
    ckpt_path = Path(ckpt_path)
    splits = tuple(splits)
    out_path = Path(out) if out else ckpt_path.with_suffix(".eval.json")
    # before the work, so results are never computed and then lost
    validate_eval_options(splits, str(out_path), clip_benchmark_dir=clip_benchmark_dir)
    student, config, _ = load_checkpoint_student(ckpt_path)
    open_vocab = isinstance(student, OpenVocabStudent)
    if clip_benchmark_dir is not None and not open_vocab:
        raise ConfigError(f"clip_benchmark_dir= is for open-vocabulary students (method=openvocab); {ckpt_path} holds "
                          f"a closed-set student (method={config['method']['name']}), evaluated without a teacher")
    bench_dir = Path(clip_benchmark_dir) if clip_benchmark_dir is not None else _clip_benchmark_beside(out_path)
    if open_vocab and clip_benchmark_dir is None:
        check_writable(bench_dir, "the clip_benchmark results folder")
    if overrides:
        config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(config), OmegaConf.create(dict(overrides))))
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    if data.num_classes != student.num_classes:
        raise MismatchError(f"{ckpt_path} classifies {student.num_classes} classes; its data has "
                            f"{data.num_classes}")
    results: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    _score_splits(student, data, splits, results, accelerator=config["trainer"].get("accelerator", "auto"),
                  precision=config["trainer"].get("precision", "32-true"),
                  progress=bool(config["trainer"].get("enable_progress_bar", True)))
    if open_vocab:
        teacher = load_teacher(config)
        student.to(next(teacher.parameters()).device)
        report = open_vocab_report(student, data, config, teacher, student_weights=str(ckpt_path))
        log.info("%s", format_report(report))
        results["open_vocab"] = report
        results["clip_benchmark_dir"] = str(bench_dir)
    _write_results(results, out_path, bench_dir if open_vocab else None)
    return results


def evaluate_exported(model_path: str | os.PathLike, data_overrides: Mapping[str, Any] | None = None,
                      splits=("val", "test"), out: str | None = None) -> dict[str, Any]:
    """Evaluate an exported student (``student.onnx``, ``student.int8.onnx``, ``student.pt2``, or the export folder)
    on the splits of the run it came from, as :func:`evaluate` does its checkpoint: the number of the file that ships.

    The data section and seed come from the ``student.json`` beside the model, with ``data_overrides`` (keys of the
    data section, or ``{"data": {...}}``) merged in. The model runs on the CPU in float32 (ONNX in onnxruntime).
    Results go to ``out`` (default: beside the model, ``student.onnx.eval.json`` for ``student.onnx``).
    """
    overrides = dict(data_overrides or {})
    if set(overrides) - {"data"} and "data" in overrides:
        raise ConfigError(f"pand eval model=... takes data.KEY=VALUE overrides only, not "
                          f"{', '.join(sorted(set(overrides) - {'data'}))}: an exported model keeps no other part of "
                          "its run's config (it runs on the CPU in float32)")
    path = exported_model_file(model_path)
    splits = tuple(splits)
    # the model's full name: student.onnx and student.int8.onnx of one folder never share a results file
    out_path = Path(out) if out else path.with_name(path.name + ".eval.json")
    validate_eval_options(splits, str(out_path))  # before the work, so results are never computed and then lost
    exported = load_exported(path)
    meta, model = exported.meta, exported.model
    if not isinstance(meta.get("data"), Mapping):
        ckpt = (meta.get("checkpoint") or {}).get("path")
        raise ConfigError(f"{exported.metadata_path} has no data section (an export of an earlier pand), so the "
                          "splits of its run cannot be rebuilt; export it again, or evaluate "
                          f"{'the checkpoint ' + ckpt if ckpt else 'its checkpoint'} with pand eval ckpt_path=...")
    config = with_data_overrides({"data": meta["data"]}, overrides)
    data = PandDataModule(config["data"], seed=int(meta.get("seed", 0)))
    names = exported.class_names
    if data.num_classes != model.num_classes:
        raise MismatchError(f"{path} classifies {model.num_classes} classes; its data has {data.num_classes}")
    # pand's stand-in names (a checkpoint without its class list) say nothing; real names must be the data's
    if list(data.classes) != names and names != [f"class {i}" for i in range(len(names))]:
        differ = next(i for i, (a, b) in enumerate(zip(names, data.classes)) if a != b)
        raise MismatchError(f"{path} was exported for other classes than its data's: class {differ} is "
                            f"{names[differ]!r} there, {data.classes[differ]!r} in the data (an open-vocabulary "
                            "student exported with class_names=...?); top-1 would score other classes")
    results: dict[str, Any] = {"model": str(path), "format": model.format, "runtime": model.runtime,
                               "model_sha256": file_sha256(path), "exported_from": meta.get("checkpoint")}
    _score_splits(model, data, splits, results, accelerator="cpu", precision="32-true",
                  progress=sys.stderr.isatty())
    if meta.get("open_vocabulary") is not None:
        ckpt = (meta.get("checkpoint") or {}).get("path") or "..."
        results["note"] = ("open-vocabulary student: top-1 on its exported classes only; the open-vocabulary report "
                           "(base / novel, retrieval, clip_benchmark) needs its checkpoint and teacher: pand eval "
                           f"ckpt_path={ckpt}")
    _write_results(results, out_path)
    return results


def _score_splits(student: torch.nn.Module, data: PandDataModule, splits: tuple[str, ...], results: dict[str, Any],
                  *, accelerator: str, precision: str, progress: bool) -> None:
    """Top-1 / top-5 of ``student`` on each split into ``results`` (``<split>_acc1``, ``_acc5``, ``_size``, or
    ``<split>_skipped`` with the reason): one loop for checkpoints and exported models, so both report alike."""
    module = DistillationModule(Distiller(student, data.num_classes))
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=progress,
        use_distributed_sampler=False, enable_checkpointing=False, precision=precision,
    )
    for split in splits:
        why = _why_not_scored(data, split)
        if why:
            results[f"{split}_skipped"] = why
    for split in (s for s in splits if f"{s}_skipped" not in results):
        loader = data.eval_dataloader(split)
        metrics = (trainer.validate if split == "val" else trainer.test)(module, dataloaders=loader, verbose=False)[0]
        results[f"{split}_acc1"] = _as_float(metrics[f"{split}/acc1"])
        results[f"{split}_acc5"] = _as_float(metrics[f"{split}/acc5"])
        results[f"{split}_size"] = len(data.splits[split])


def _write_results(results: dict[str, Any], out_path: Path, bench_dir: Path | None = None) -> None:
    written = out_path
    try:
        atomic_write_json(out_path, results)
        if bench_dir is not None:
            written = bench_dir
            write_clip_benchmark(results["open_vocab"]["clip_benchmark"], bench_dir)
    except OSError as err:
        # The folder was checked before; if it fails now (disk filled up), the numbers still reach the user.
        log.error("results: %s", results)
        reason = OUTPUT_ERRNOS.get(err.errno, err.strerror or str(err))
        raise OutputError(f"could not write {written}: {reason}; the results are printed above") from None


def _why_not_scored(data: PandDataModule, split: str) -> str | None:
    """Why ``pand eval`` cannot score top-1 on ``split`` of ``data`` (``None``: it can)."""
    if split == "val" and data.label_free:
        # training labelled them with the teacher's predictions
        return "label-free run: its val images carry no labels (training scored them by agreement with the teacher)"
    if not data.scored(split):  # a captions test split
        return ("its images have captions but no class to score top-1 on; the two-way caption retrieval under "
                "open_vocab scores them")
    return None


def _clip_benchmark_beside(out_path: Path) -> Path:
    """``best.clip_benchmark`` beside ``best.eval.json``: one folder per results file, so that the files of two
    evaluations (two checkpoints of a run, or ``out=`` elsewhere) never mix in one folder."""
    stem = out_path.name[:-len(".json")] if out_path.name.endswith(".json") else out_path.name
    stem = stem[:-len(".eval")] if stem.endswith(".eval") else stem
    return out_path.with_name(stem + ".clip_benchmark")


def build_cache(config: Mapping[str, Any]) -> TeacherCache | None:
    """``pand cache build``: one process, or each process of a launch of several (``torchrun``, or one process per
    node with ``NODE_RANK``: :mod:`pand.engine.launch`) building its share of the shards.

    Here, beside ``train`` and ``evaluate``, rather than in :mod:`pand.engine.teacher_side`: an entry point checks its
    config first (:mod:`pand.engine.config_checks`), and those checks import the teacher side.
    """
    if not teacher_cache_settings(config):
        raise ConfigError("set cache.dir=/path/to/cache and cache.views=K (> 0) to build a teacher cache")
    validate_train_config(config, for_cache_build=True)
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    data.check_outputs_outside({"cache.dir": config["cache"]["dir"]})
    launch = launched_ranks(config)
    if launch is None:
        return open_or_build_cache(config, data)
    import torch.distributed as dist

    join_launch(*launch)
    try:
        return open_or_build_cache(config, data, rank=launch[0], world_size=launch[1], barrier=all_ok)
    finally:
        dist.destroy_process_group()


def export_teacher_cache(config: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """``pand cache export``: the run's complete teacher cache as WebDataset tars, each image named by its key in the
    run's dataset (:mod:`pand.cache.teacher.portable`)."""
    if not (config.get("cache") or {}).get("dir"):
        raise ConfigError("set cache.dir=/path/to/cache (the cache to export) and the run's data settings")
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    pool = data.train_pool
    folder = Path(config["cache"]["dir"])
    meta = TeacherCache.open(folder).meta
    if meta["fingerprint"] != pool.fingerprint():
        raise MismatchError(f"the teacher cache at {folder} was built for other training images than this config's "
                            "data: give the settings of the run it was built for")
    return export_cache(folder, out, pool.sample_id, pool.targets)
