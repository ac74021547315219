"""The bottom of the config layer: the error type and the helpers that check a section against its schema.

It imports nothing from genlab, so every module may use it: ``lab_utils.data`` (whose datasets check
their own sections) sits below ``lab_utils.config`` (which validates a whole training config and so
needs the datasets and the labs), and neither imports the other in a circle.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def check_section(section: DictConfig, schema: type, where: str) -> DictConfig:
    """Merge ``section`` onto ``schema`` (types, unknown keys) and run the schema's own checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        OmegaConf.to_object(merged)  # instantiates the dataclass: runs __post_init__ checks
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad value in `{where}`: {err.msg if hasattr(err, 'msg') else err}".strip()
                          + f"\n  (see the schema {schema.__module__}.{schema.__qualname__})") from None
    except ValueError as err:
        raise ConfigError(f"bad value in `{where}`: {err}") from None
    return merged


def as_dataclass(schema: type, cfg: Any) -> Any:
    """``schema`` (a config dataclass) from an instance of it, a DictConfig or a plain dict; building it
    runs the schema's own checks. How each lab turns ``cfg.model`` into its typed config."""
    if isinstance(cfg, schema):
        return cfg
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts/lists (what checkpoints and config.yaml store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
