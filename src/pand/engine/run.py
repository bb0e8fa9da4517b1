"""``pand train`` and ``pand eval``: build everything from a config, run Lightning, write the run folder.

A run folder holds ``config.yaml`` (resolved), ``metrics.csv``, ``checkpoints/{best,last}.ckpt`` and ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from pand.cache.teacher import CachedTeacherSource, TeacherCache, cache_record
from pand.distillers import Distiller, TeacherContext, build_distiller, get_distiller_class
from pand.engine.csv_log import CsvMetricsLogger
from pand.engine.data import PandDataModule
from pand.engine.module import DistillationModule
from pand.errors import ConfigError, MismatchError, PandError
from pand.io import atomic_write_json, atomic_write_text
from pand.students import build_student
from pand.teachers import LiveTeacherSource, load_clip_teacher

log = logging.getLogger("pand")

# Set by rank 0 so that the processes the DDP launcher starts write into the same run folder.
_RUN_DIR_ENV = "PAND_RUN_DIR"


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
    return build_student(
        s["name"], num_classes, source=s.get("source", "auto"), pretrained=bool(s.get("pretrained", True)),
        weights=s.get("weights"),
    )


def load_teacher_from(config: Mapping[str, Any], device: str | None = None):
    """The configured teacher, on ``device`` (default: the GPU when the trainer may use one)."""
    t = config["teacher"]
    if device is None:
        accelerator = config.get("trainer", {}).get("accelerator")
        device = "cuda" if torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto") else "cpu"
    return load_clip_teacher(
        t["model"], t.get("pretrained"), logit_scale=t.get("logit_scale"), cache_dir=t.get("cache_dir"),
        device=device, force_quick_gelu=bool(t.get("force_quick_gelu", False)),
    )


def load_prompt_embeds(path: str | None, teacher_identity: Mapping[str, str], classes: list[str]) -> torch.Tensor | None:
    """Learned CoOp text features from ``pand prompts``, refused if made with another teacher or class list."""
    if not path:
        return None
    from pand.prompts.store import load_text_features

    return load_text_features(path, teacher_identity, classes)


def teacher_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher as configured: what a teacher cache must have been built with (checked without loading it)."""
    t = config["teacher"]
    return {"model": t["model"], "pretrained": t.get("pretrained"), "force_quick_gelu": bool(t.get("force_quick_gelu"))}


def cache_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    cache = dict(config.get("cache") or {})
    return cache if cache.get("dir") and int(cache.get("views", 0)) > 0 else None


def open_or_build_cache(config: Mapping[str, Any], data: PandDataModule, teacher=None, rank: int = 0,
                        world_size: int = 1, barrier=None) -> TeacherCache | None:
    """The run's teacher cache: opened if it matches, built (or resumed) with the live teacher if not.

    Returns None on a process that built only its share and is not the one that completes the cache.
    """
    settings = cache_settings(config)
    train = data.splits["train"]
    templates = list(config["data"]["templates"])
    expected = cache_record(teacher_spec=teacher_spec(config), dataset=train, augment=data.augment,
                            views=int(settings["views"]), seed=int(settings.get("seed", 0)), templates=templates)
    try:
        return TeacherCache.open(settings["dir"], expected)
    except MismatchError:
        if not settings.get("rebuild"):
            raise
    except PandError:
        pass  # missing or incomplete: build / resume below
    teacher = teacher or load_teacher_from(config)
    source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    return TeacherCache.build(
        settings["dir"], expected, train, data.augment, source, teacher.class_embeddings(train.classes, templates),
        teacher.identity, embed_dim=teacher.embed_dim, learned_logit_scale=float(teacher.model.logit_scale.exp()),
        batch_size=int(settings.get("batch_size", 64)), rank=rank, world_size=world_size,
        rebuild=bool(settings.get("rebuild")), barrier=barrier,
    )


def build_cache(config: Mapping[str, Any]) -> TeacherCache | None:
    """``pand cache build``: one process, or each process of a ``torchrun`` launch building its share."""
    if not cache_settings(config):
        raise ConfigError("set cache.dir=/path/to/cache and cache.views=K (> 0) to build a teacher cache")
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return open_or_build_cache(config, data)
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        teacher = load_teacher_from(config)
        return open_or_build_cache(config, data, teacher, rank=rank, world_size=world, barrier=dist.barrier)
    finally:
        dist.destroy_process_group()


def build_training(config: Mapping[str, Any]) -> tuple[PandDataModule, DistillationModule]:
    """Data module and Lightning module for a resolved training config.

    The teacher is loaded only if the method needs it and no teacher cache covers the run.
    """
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    classes = data.classes
    method_cls = get_distiller_class(config["method"]["name"])
    context, source = None, None
    text_features = config["teacher"].get("text_features")
    if method_cls.requires and cache_settings(config):
        cache = open_or_build_cache(config, data)
        data.teacher_cache = cache
        scale = config["teacher"].get("logit_scale")
        context = TeacherContext(
            embed_dim=int(cache.meta["embed_dim"]),
            logit_scale=float(cache.meta["learned_logit_scale"]) if scale in (None, "learned") else float(scale),
            text_embeds=cache.text_embeds(), identity=cache.meta["teacher"],
            prompt_embeds=load_prompt_embeds(text_features, cache.meta["teacher"], classes),
        )
        source = CachedTeacherSource(cache)
    elif method_cls.requires or method_cls.needs_text_embeds:
        teacher = load_teacher_from(config)
        text = teacher.class_embeddings(classes, list(config["data"]["templates"])) if method_cls.needs_text_embeds else None
        context = TeacherContext(
            embed_dim=teacher.embed_dim, logit_scale=teacher.logit_scale,
            text_embeds=None if text is None else text.cpu(), identity=teacher.identity,
            prompt_embeds=load_prompt_embeds(text_features, teacher.identity, classes),
        )
        if method_cls.requires:
            source = LiveTeacherSource(teacher, config["data"]["mean"], config["data"]["std"])
    student = build_student_from(config, len(classes))
    distiller = build_distiller(config["method"], student, len(classes), context)
    module = DistillationModule(distiller, source, optim=config["optim"], config=config)
    return data, module


def build_trainer(
    config: Mapping[str, Any], run_dir: Path, resume_step: int | None = None
) -> tuple[L.Trainer, ModelCheckpoint]:
    kwargs = {k: v for k, v in dict(config["trainer"]).items() if v is not None}
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc1", mode="max", save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=CsvMetricsLogger(run_dir, resume_step),
        callbacks=[checkpoint],
        use_distributed_sampler=False,
        **kwargs,
    )
    return trainer, checkpoint


def train(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train, select on val, test once; returns (and on rank 0 writes) the run summary."""
    config = dict(config)
    L.seed_everything(int(config["seed"]), workers=True, verbose=False)
    run_dir = resolve_run_dir(config).resolve()
    os.environ[_RUN_DIR_ENV] = str(run_dir)
    try:
        return _train(config, run_dir)
    finally:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            os.environ.pop(_RUN_DIR_ENV, None)


def _train(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    ckpt_path = config.get("ckpt_path")
    resume_step = None
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path {ckpt_path} does not exist")
        stored_ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        stored = checkpoint_config(stored_ckpt, ckpt_path)
        resume_step = int(stored_ckpt.get("global_step", 0))
        for group in ("data", "student", "method"):
            for key in ("name", "num_classes"):
                if stored.get(group, {}).get(key) != config[group].get(key):
                    raise MismatchError(
                        f"cannot resume from {ckpt_path}: it was trained with {group}.{key}="
                        f"{stored.get(group, {}).get(key)!r}, this run has {config[group].get(key)!r}"
                    )
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(
            f"run folder {run_dir} already holds checkpoints; resume with "
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} or choose another run_dir"
        )
    data, module = build_training(config)
    trainer, checkpoint = build_trainer(config, run_dir, resume_step)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    start = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = time.time() - start
    best = checkpoint.best_model_path or checkpoint.last_model_path
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": config["data"]["name"],
        "method": config["method"]["name"],
        "student": config["student"]["name"],
        "teacher": config["teacher"]["model"] if module.distiller.uses_teacher else None,
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "best_checkpoint": best,
        "val_acc1": _as_float(checkpoint.best_model_score),
        "test_acc1": None,
    }
    if config.get("test", True):
        results = trainer.test(module, datamodule=data, ckpt_path=best, weights_only=True, verbose=False)
        summary["test_acc1"] = _as_float(results[0].get("test/acc1")) if results else None
        summary["test_acc5"] = _as_float(results[0].get("test/acc5")) if results else None
    summary["total_seconds"] = round(time.time() - start, 2)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def checkpoint_config(ckpt: Mapping[str, Any], ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The resolved training config stored in a pand checkpoint."""
    try:
        return ckpt["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise ConfigError(f"{ckpt_path} is not a pand training checkpoint (no stored config)") from None


def evaluate(ckpt_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
             splits=("val", "test"), out: str | None = None) -> dict[str, Any]:
    """Evaluate the student of a checkpoint on the given splits, without loading any teacher."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"checkpoint {ckpt_path} does not exist")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config = checkpoint_config(ckpt, ckpt_path)
    if overrides:
        config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(config), OmegaConf.create(dict(overrides))))
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    student = build_student_from({**config, "student": {**config["student"], "pretrained": False, "weights": None}}, data.num_classes)
    prefix = "distiller.student."
    student_state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    student.load_state_dict(student_state)
    module = DistillationModule(Distiller(student, data.num_classes))
    trainer = L.Trainer(
        accelerator=config["trainer"].get("accelerator", "auto"), devices=1, logger=False,
        enable_progress_bar=bool(config["trainer"].get("enable_progress_bar", True)),
        use_distributed_sampler=False,
        precision=config["trainer"].get("precision", "32-true"),
    )
    results: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    for split in splits:
        if split not in ("val", "test"):
            raise ConfigError(f"eval splits must be val and/or test, got {split!r}")
        loader = data.eval_dataloader(split)
        metrics = (trainer.validate if split == "val" else trainer.test)(module, dataloaders=loader, verbose=False)[0]
        results[f"{split}_acc1"] = _as_float(metrics[f"{split}/acc1"])
        results[f"{split}_acc5"] = _as_float(metrics[f"{split}/acc5"])
        results[f"{split}_size"] = len(data.splits[split])
    atomic_write_json(Path(out) if out else ckpt_path.with_suffix(".eval.json"), results)
    return results
