"""PAND stage 1 (PSC): ``pand features`` and ``pand prompts``.

Teacher image embeddings of each split are extracted once and stored (:mod:`pand.stage1.features`); CoOp context vectors
are then trained on the stored training embeddings, selected on the val embeddings, and the resulting class text
features are written with their provenance for stage 2 (``teacher.text_features=...``). The test split is scored
once for the report.

``features.precision`` and ``prompts.precision`` (fp32 by default; bf16 or fp16 under autocast, checked against fp32
on the first batch, see :mod:`pand.teachers.precision`) set the precision of the teacher passes; the text features
``pand prompts`` stores are always encoded in fp32.

Both read the composed ``train`` config, the one stage 2 trains with: its ``features`` and ``prompts`` sections (and
``data``, ``teacher``, ``paths``, ``seed``), so one experiment file and one set of overrides serve both stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pand.data.assembly import load_splits
from pand.data.walk import input_folders, refuse_outputs_inside
from pand.errors import ConfigError
from pand.io import atomic_write_json, mark_output_folder
from pand.rules import resolve_device
from pand.stage1.checks import validate_coop_config
from pand.stage1.coop import train_coop
from pand.stage1.features import ensure_features, stored_agreement
from pand.stage1.learner import PromptLearner
from pand.stage1.store import save_text_features
from pand.teachers.precision import DEFAULT_TOLERANCE
from pand.teachers.registry import load_teacher

log = logging.getLogger("pand")


def _device(config: Mapping[str, Any]) -> str:
    """``features.device``: where stage 1 runs the teacher (``auto``: the GPU if there is one)."""
    return resolve_device((config.get("features") or {}).get("device"))


def run_features(config: Mapping[str, Any], teacher=None, splits=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stored (or freshly extracted) teacher embeddings and labels of every split in ``features.splits``."""
    feats = config["features"]
    if teacher is None:
        validate_coop_config(config, writes_prompts=False)
        teacher = load_teacher(config, _device(config))
    splits = splits or load_splits(config["data"])
    refuse_outputs_inside(input_folders(splits), {"features.dir": feats["dir"]})
    folder = Path(feats["dir"])
    created = not folder.exists()  # marked only when pand makes it: features.dir may name a folder of the user's
    out = {}
    for split in feats["splits"]:
        if split not in splits:
            raise ConfigError(f"features.splits may hold train, val and test, got {split!r}")
        out[split] = ensure_features(
            Path(feats["dir"]) / f"{split}.safetensors", teacher, splits[split], rebuild=bool(feats.get("rebuild")),
            batch_size=int(feats["batch_size"]), num_workers=int(feats["num_workers"]),
            precision=feats.get("precision", "fp32"),
            tolerance=float(feats.get("precision_tolerance", DEFAULT_TOLERANCE)),
        )
    if created and folder.is_dir():  # features and learned prompts: never to be walked as input images
        mark_output_folder(folder, "features")
    return out


def features_agreement(config: Mapping[str, Any], splits=None) -> dict[str, dict[str, Any]]:
    """The measured fp32 agreement stored with each low-precision feature file of ``splits`` (default
    ``features.splits``), by split; empty for fp32 files."""
    feats = config["features"]
    found = {}
    for split in splits or feats["splits"]:
        stats = stored_agreement(Path(feats["dir"]) / f"{split}.safetensors")
        if stats is not None:
            found[split] = stats
    return found


def _coop_logit_scale(option: Any, teacher) -> float:
    """``prompts.logit_scale``: null keeps the teacher's configured scale, ``learned`` takes the model's own."""
    if option is None:
        return float(teacher.logit_scale)
    if option == "learned":
        return float(teacher.model.logit_scale.exp())
    return float(option)


def _accuracy(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    return float(((features.float() @ text.float().t()).argmax(1) == labels).float().mean())


def run_prompts(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train CoOp on stored teacher features; write the learned text features and a summary; return the summary."""
    p = config["prompts"]
    validate_coop_config(config, writes_prompts=True)
    device = _device(config)
    teacher = load_teacher(config, device)
    splits = load_splits(config["data"])
    features = run_features({**config, "features": {**config["features"], "splits": ["train", "val", "test"]}},
                            teacher, splits)
    classes = splits["train"].classes
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = features["train"], features["val"], features["test"]

    templates = list(config["data"]["templates"])
    zero_shot = teacher.class_embeddings(classes, templates).cpu()
    scale = _coop_logit_scale(p.get("logit_scale"), teacher)
    start = time.time()
    learner = PromptLearner(
        teacher.model, teacher.tokenizer, classes, n_ctx=int(p["n_ctx"]), ctx_init=p.get("ctx_init"),
        csc=bool(p["csc"]), class_token_position=p["class_token_position"],
    )
    result = train_coop(
        learner, tr_x, tr_y, va_x, va_y, logit_scale=scale, epochs=int(p["epochs"]),
        batch_size=int(p["batch_size"]), lr=float(p["lr"]), momentum=float(p["momentum"]),
        weight_decay=float(p["weight_decay"]), warmup_epochs=int(p["warmup_epochs"]), warmup_lr=float(p["warmup_lr"]),
        seed=int(config["seed"]), device=device, precision=p.get("precision", "fp32"),
        tolerance=float(p.get("precision_tolerance", DEFAULT_TOLERANCE)),
    )
    learned = result.text_features.cpu()
    summary = {
        "teacher": teacher.identity,
        "dataset": config["data"]["name"],
        "classes": list(classes),
        "templates": templates,
        "n_ctx": int(learner.ctx.shape[-2]),
        "ctx_init": p.get("ctx_init"),
        "csc": bool(p["csc"]),
        "class_token_position": p["class_token_position"],
        "epochs": int(p["epochs"]),
        "logit_scale": scale,
        "best_epoch": int(result.best_epoch),
        "zero_shot_val_acc": _accuracy(va_x, va_y, zero_shot),
        "zero_shot_test_acc": _accuracy(te_x, te_y, zero_shot),
        "coop_val_acc": float(result.val_acc),
        "coop_test_acc": _accuracy(te_x, te_y, learned),
        "train_seconds": round(time.time() - start, 2),
    }
    # Only low-precision runs add these: an fp32 summary, and the text-feature record made from it, stay as they were.
    if result.precision != "fp32":
        summary["precision"] = result.precision
        summary["text_features_agreement"] = result.text_features_agreement
    agreement = features_agreement(config, ["train", "val", "test"])
    if agreement:
        summary["features_precision"] = config["features"].get("precision", "fp32")
        summary["features_agreement"] = agreement
    out = Path(p["out"])
    save_text_features(out, learned, summary)
    summary["text_features"] = str(out)
    atomic_write_json(out.with_suffix(".json"), {**summary, "classes": len(classes)})
    return summary
