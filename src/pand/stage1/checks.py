"""Checks of the settings ``pand features`` and ``pand prompts`` read (the ``features`` and ``prompts`` sections of
the train config, and what they share with training), run before the teacher loads. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pand.io import check_writable
from pand.rules import (
    BOOL,
    MISSING,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    check_rules,
    choice,
    data_setting_errors,
    device_errors,
    integer,
    lookup,
    number,
    raise_option_errors,
    show,
)
from pand.teachers.precision import PRECISION_RULE, TOLERANCE_RULE

STAGE1_SPLITS = ("train", "val", "test")

COOP_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "features.batch_size": integer(1),
    "features.num_workers": integer(0),
    "features.rebuild": BOOL,
    "features.precision": PRECISION_RULE,
    "features.precision_tolerance": TOLERANCE_RULE,
    "prompts.n_ctx": integer(1),
    "prompts.csc": BOOL,
    "prompts.class_token_position": choice("end", "middle", "front"),
    "prompts.epochs": integer(1),
    "prompts.batch_size": integer(1),
    "prompts.lr": POSITIVE,
    "prompts.momentum": number(0, 1, high_open=True),
    "prompts.weight_decay": NON_NEGATIVE,
    "prompts.warmup_epochs": integer(0),
    "prompts.warmup_lr": NON_NEGATIVE,
    "prompts.logit_scale": number(0, low_open=True, optional=True, also=("learned",)),
    "prompts.precision": PRECISION_RULE,
    "prompts.precision_tolerance": TOLERANCE_RULE,
    "data.val_fraction": number(0, 1, high_open=True),
    "data.samples_per_class": integer(1, optional=True),
    "data.image_size": integer(1),
    "data.resize_size": integer(1),
}


def validate_coop_config(config: Mapping[str, Any], *, writes_prompts: bool) -> None:
    """Refuse a ``pand features`` / ``pand prompts`` config with an invalid setting or unwritable output."""
    errors = check_rules(config, COOP_RULES) + data_setting_errors(config)
    splits = lookup(config, "features.splits")
    if splits is not MISSING and (not splits or any(s not in STAGE1_SPLITS for s in splits)):
        errors.append(f"features.splits={show(splits)} is not allowed: expected a non-empty list of train, val, test")
    device = lookup(config, "features.device")
    if device not in (MISSING, None):
        errors += device_errors("features.device", device)
    raise_option_errors(errors, "stage-1 setting")
    check_writable(config["features"]["dir"], "the features folder (features.dir)")
    if writes_prompts:
        check_writable(Path(config["prompts"]["out"]).parent, "the output folder of prompts.out=")
