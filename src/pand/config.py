"""Compose pand's packaged Hydra configs with command-line style overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pand.errors import ConfigError

# Resolvers used by the packaged configs to build file names.
if not OmegaConf.has_resolver("sanitize"):
    OmegaConf.register_new_resolver("sanitize", lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s)))
if not OmegaConf.has_resolver("pand_asset"):
    # Files shipped inside the package (e.g. the quickstart teacher's weights), wherever pand is installed.
    OmegaConf.register_new_resolver("pand_asset", lambda name: str(Path(__file__).parent / "assets" / name))
if not OmegaConf.has_resolver("csc_tag"):
    OmegaConf.register_new_resolver("csc_tag", lambda csc: "-csc" if csc else "")


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``config_name`` (``train``, ``eval``) with Hydra overrides such as ``data=cub trainer.devices=4``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="pand.configs", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad configuration or override: {err}") from err


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations into plain Python containers (safe to store in a weights-only checkpoint)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a missing or bad value
        raise ConfigError(f"incomplete configuration: {err}") from err
