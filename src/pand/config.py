"""Compose pand's packaged Hydra configs with command-line style overrides."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pand.config_catalogue import CONFIGS_DIR, config_groups
from pand.errors import ConfigError, close_matches, did_you_mean
from pand.known_names import explain
from pand.rules import lookup

# Resolvers used by the packaged configs to build file names.
if not OmegaConf.has_resolver("sanitize"):
    OmegaConf.register_new_resolver("sanitize", lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s)))
if not OmegaConf.has_resolver("pand_asset"):
    # Files shipped inside the package (e.g. the quickstart teacher's weights), wherever pand is installed.
    OmegaConf.register_new_resolver("pand_asset", lambda name: str(Path(__file__).parent / "assets" / name))
if not OmegaConf.has_resolver("csc_tag"):
    OmegaConf.register_new_resolver("csc_tag", lambda csc: "-csc" if csc else "")


#: The keyword arguments of ``lightning.Trainer`` (Lightning 2.6), in its signature's order: ``trainer.NAME=VALUE`` sets
#: any of them without Hydra's ``+``, and without importing Lightning to find out (tests/test_cli.py compares this
#: tuple with ``inspect.signature(lightning.Trainer.__init__)``, so that it follows Lightning).
TRAINER_ARGS: tuple[str, ...] = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval", "check_val_every_n_epoch",
    "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark",
    "inference_mode", "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
    "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams", "model_registry",
)


def _choices(group: str, fallback: str) -> str:

    options = config_groups().get(group)
    return f"{group}={'|'.join(options)}" if options else fallback


#: Trainer arguments that pand sets itself, each with where the setting lives instead (a function: the group options
#: are scanned when the message is written).
PAND_TRAINER_ARGS: dict[str, Callable[[], str]] = {
    "logger": lambda: f"choose the loggers with {_choices('logger', 'logger=csv|tensorboard|wandb|mlflow|none')} "
                      "(their options: logger.<name>.*)",
    "callbacks": lambda: f"choose callbacks with {_choices('callbacks', 'callbacks=...')} (each entry of the "
                         "callbacks section is a Lightning callback; `pand config` shows them)",
    "plugins": lambda: "pand installs its own checkpoint writer (atomic saves); precision is "
                       "trainer.precision=..., the distributed setting trainer.strategy=...",
    "enable_checkpointing": lambda: "pand always writes checkpoints/last.ckpt (every epoch) and best.ckpt (on "
                                    "val/acc1); checkpoint.every_n_steps=N also writes last.ckpt every N steps",
    "default_root_dir": lambda: "the run folder is run_dir=PATH (default: <paths.runs_dir>/<data>-<method>-<student>-"
                                "<time>; paths.runs_dir=DIR moves them all)",
    "use_distributed_sampler": lambda: "pand's data module shards the data between processes itself (select DDP "
                                       "with trainer=ddp or trainer.strategy=ddp trainer.devices=N)",
}

_SET_BY_PAND = "is set by pand, not on the command line"
_NOT_FOUND = object()


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``config_name`` (``train``, ``eval``) with Hydra overrides such as ``data=cub trainer.devices=4``.

    ``trainer.NAME=VALUE`` works for any ``lightning.Trainer`` argument (no ``+`` needed). A misspelt key, group
    option or group, a sweep without ``-m`` and a trainer argument that pand sets itself are refused with a
    :class:`ConfigError` that names the closest valid choices.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    prepared = _prepare_overrides(list(overrides))
    try:
        cfg = _hydra_compose(config_name, prepared)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(config_name, prepared, err)) from err
    trainer = cfg.get("trainer") if "trainer" in cfg else None
    if isinstance(trainer, DictConfig):
        owned = [k for k in PAND_TRAINER_ARGS if k in trainer]
        if owned:
            raise ConfigError(f"trainer.{owned[0]} (from a config file) {_SET_BY_PAND}: "
                              f"{PAND_TRAINER_ARGS[owned[0]]()}")
    return cfg


def _hydra_compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="pand.configs", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def parse_overrides(lines: list[str]) -> list:
    """Hydra's parsed overrides of ``lines``; a line its grammar cannot read is a one-line :class:`ConfigError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(lines))
    except HydraException as err:
        # Hydra's first line says what is wrong; the caret drawing and the link under it do not fit one line.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f" {lines[0]!r}" if len(lines) == 1 else ""
        raise ConfigError(f"cannot read the override{where}: {first}") from err


def _parse_override(line: str):
    return parse_overrides([line])[0]


def _prepare_overrides(overrides: list[str]) -> list[str]:
    """Refuse what Hydra would refuse obscurely (a sweep, an unknown group option, a trainer argument pand sets) and
    turn ``trainer.NAME=VALUE`` into ``++trainer.NAME=VALUE`` for every Trainer argument (set or add)."""

    groups = config_groups()
    prepared = []
    for line in overrides:
        o = _parse_override(line)
        key = o.key_or_group
        if o.is_sweep_override():
            raise ConfigError(f"{line} gives several values (a sweep): add -m to run one training per value "
                              f"(pand train -m {line} ...) or use pand sweep; quote a single value that contains "
                              "commas, e.g. 'key=\"a,b\"'")
        if key in groups and o.package is None and not o.is_delete():
            value = o.value()
            if isinstance(value, str) and value not in groups[key]:
                known = explain(key, value, groups[key], line)
                if known:
                    raise ConfigError(known)
                hint = did_you_mean([f"{key}={m}" for m in close_matches(value, groups[key])])
                raise ConfigError(f"unknown {key} option {value!r} (in {line}){hint}; {key} options: "
                                  f"{', '.join(groups[key])}")
        if key.startswith("trainer.") and o.package is None:
            name = key.split(".")[1]
            if name in PAND_TRAINER_ARGS and not o.is_delete():
                raise ConfigError(f"trainer.{name} {_SET_BY_PAND} (in {line}): {PAND_TRAINER_ARGS[name]()}")
            if key == f"trainer.{name}" and name in TRAINER_ARGS and not o.is_delete():
                line = "++" + line.lstrip("+")
        prepared.append(line)
    return prepared


def _explain(config_name: str, overrides: list[str], err: Exception) -> str:
    """A pand message for a failed composition: the override whose key does not exist, with the closest keys."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException


    hydra_text = f"bad configuration or override: {' '.join(str(err).split())}"
    groups = config_groups()
    parsed = [(line, _parse_override(line)) for line in overrides]
    group_lines = [line for line, o in parsed if o.key_or_group in groups or "/" in o.key_or_group]
    try:
        base = OmegaConf.to_container(_hydra_compose(config_name, group_lines), resolve=False)
    except (HydraException, OmegaConfBaseException):
        return hydra_text
    for line, o in parsed:
        key = o.key_or_group
        if line in group_lines or o.package is not None or key.startswith("hydra.") or o.is_force_add():
            continue
        found = lookup(base, key, _NOT_FOUND) is not _NOT_FOUND
        if o.is_add() and found:
            return (f"{key} is already in the config (in {line}): write {line.lstrip('+')} without the +, which "
                    "only adds a key the config does not have")
        if not o.is_add() and not found:
            return _unknown_key(line, o, base, groups)
    return hydra_text


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            keys.append(path)
            keys.extend(_dotted_keys(v, path + "."))
    return keys


def _unknown_key(line: str, o: Any, base: dict, groups: dict[str, list[str]]) -> str:

    key = o.key_or_group
    value = line.split("=", 1)[1] if "=" in line else ""
    parent, _, name = key.rpartition(".")
    parent_node = lookup(base, parent, None) if parent else base
    what = "cannot remove" if o.is_delete() else "unknown setting"
    if parent and isinstance(parent_node, dict) or not parent:
        siblings = list(parent_node) if isinstance(parent_node, dict) else []
        if not parent:
            siblings += list(groups)
        if parent == "trainer":
            siblings += [a for a in TRAINER_ARGS if a not in PAND_TRAINER_ARGS]
        matches = [f"{parent}.{m}" if parent else m for m in close_matches(name, siblings)]
    else:
        matches = []
    if not matches and not isinstance(parent_node, dict):  # a misspelt section: compare whole dotted keys
        extra = [f"trainer.{a}" for a in TRAINER_ARGS if a not in PAND_TRAINER_ARGS]
        matches = close_matches(key, [*_dotted_keys(base), *groups, *extra], cutoff=0.75)

    def spelled(k: str) -> str:
        return f"~{k}" if o.is_delete() else f"{k}={value}"

    message = f"{what} {key!r} (in {line})" + did_you_mean([spelled(m) for m in matches])
    if o.is_delete():
        return message if matches else message + ": it is not in the config (`pand config` prints every setting)"
    if parent == "trainer" and not matches:
        message += (f"; {name} is not an argument of lightning.Trainer; trainer.NAME takes any of them (see "
                    "`pand train --help`)")
    elif not matches:
        if isinstance(parent_node, dict) and parent_node and len(parent_node) <= 30:
            message += f"; {parent or 'the top level'} has: {', '.join(map(str, parent_node))}"
        message += "; `pand config` prints every setting"
    if isinstance(parent_node, dict) and parent and (not parent_node or parent.endswith("kwargs")) \
            and not o.is_delete():
        # A free-form mapping (e.g. student.kwargs, passed to the model's constructor) takes new keys.
        message += f"; {parent} is free-form: +{line} adds {key} as a new key"
    return message


def teacher_cache_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``cache`` settings when the run reads its teacher's outputs from a teacher cache (``cache.dir`` set, with
    at least one view), else None. The one answer to "is a teacher cache in use?", asked of unchecked configs too."""
    cache = dict(config.get("cache") or {})
    views = cache.get("views", 0)
    in_use = bool(cache.get("dir")) and isinstance(views, int) and not isinstance(views, bool) and views > 0
    return cache if in_use else None


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations into plain Python containers (safe to store in a weights-only checkpoint)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a missing or bad value
        raise ConfigError(f"incomplete configuration: {err}") from err


def group_option(group: str, option: str, configs_dir: Path | None = None) -> dict[str, Any]:
    """The section that ``group=option`` composes (``teacher=fmnist_clip``: the teacher section), read without
    composing a whole run config: for settings that hold whole sections themselves, such as the members of a teacher
    ensemble (``teacher.members``), which must get the same defaults as ``teacher=...`` gives.

    The option's file is merged over the options of its ``defaults`` list, in order, with ``_self_`` where it stands
    (last when absent), as Hydra does; interpolations are resolved. Only what the group files use is understood: a
    defaults entry naming an option of the same group; anything else is refused rather than composed differently.
    """
    folder = (configs_dir or CONFIGS_DIR) / group
    return _read_group_option(folder, group, option, ())


def _read_group_option(folder: Path, group: str, option: str, seen: tuple[str, ...]) -> dict[str, Any]:
    path = folder / f"{option}.yaml"
    if not path.is_file():
        options = config_groups(folder.parent).get(group, [])
        hint = did_you_mean([repr(m) for m in close_matches(option, options)])
        raise ConfigError(f"{group} option {option!r} does not exist{hint}; {group} options: {', '.join(options)}")
    if option in seen:
        raise ConfigError(f"the defaults of {group} option {seen[0]!r} include themselves ({' -> '.join(seen)})")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig) or "@package" in path.read_text(encoding="utf-8").split("\n", 1)[0]:
        raise ConfigError(f"{path} is not a plain section of group {group} (a mapping without a @package line)")
    own = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"]) if "defaults" in node else node
    entries = list(node.get("defaults") or [])
    if "_self_" not in entries:
        entries.append("_self_")
    merged = OmegaConf.create({})
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
        elif isinstance(entry, str) and "/" not in entry and ":" not in entry:
            base = _read_group_option(folder, group, entry, (*seen, option))
            merged = OmegaConf.merge(merged, OmegaConf.create(base))
        else:
            raise ConfigError(f"{path}: the defaults entry {entry!r} is not an option of group {group}; "
                              "pand.config.group_option reads only those")
    return to_plain(merged)


def with_data_overrides(config: Mapping[str, Any], data_overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored run config with ``data_overrides`` merged into its ``data`` section (keys of that section, or
    ``{"data": {...}}``): for commands that rebuild a run's data from a checkpoint after the data moved
    (``data.root=/new/place``)."""
    if not data_overrides:
        return dict(config)
    overrides = dict(data_overrides)
    if set(overrides) == {"data"} and isinstance(overrides["data"], Mapping):
        overrides = dict(overrides["data"])
    unknown = [k for k in overrides if k not in config["data"]]
    if unknown:  # a misspelt key would otherwise be ignored, and the run's old value used
        key = unknown[0]
        hint = did_you_mean([f"data.{m}" for m in close_matches(key, list(config["data"]))])
        raise ConfigError(f"data.{key}: the run's data section has no such setting{hint or ';'} it has "
                          f"{', '.join(sorted(config['data']))}")
    data = OmegaConf.merge(OmegaConf.create(dict(config["data"])), OmegaConf.create(overrides))
    return {**config, "data": OmegaConf.to_container(data, resolve=True)}
