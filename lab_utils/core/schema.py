"""The bottom of the config layer: the error type and the helpers that check a section against its schema.

It imports nothing from genlab, so every module may use it: ``lab_utils.core.data`` (whose datasets check
their own sections) sits below ``lab_utils.core.config`` (which validates a whole training config and so
needs the datasets and the labs), and neither imports the other in a circle.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _merged(section: DictConfig, schema: type, where: str) -> tuple[DictConfig, Any]:
    """``section`` merged onto ``schema`` (types, unknown keys) and the dataclass instance built from it (which
    runs the schema's own ``__post_init__`` checks); a bad value is one ConfigError naming ``where``."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return merged, OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad value in `{where}`: {err.msg if hasattr(err, 'msg') else err}".strip()
                          + f"\n  (see the schema {schema.__module__}.{schema.__qualname__})") from None
    except ValueError as err:
        raise ConfigError(f"bad value in `{where}`: {err}") from None


def check_section(section: DictConfig, schema: type, where: str) -> DictConfig:
    """``section`` checked against ``schema`` and with its defaults filled, still a DictConfig (what a run's
    config.yaml and checkpoint store)."""
    return _merged(section, schema, where)[0]


def typed_section(section: DictConfig, schema: type, where: str) -> Any:
    """``section`` as an instance of ``schema`` (the typed config a lab is built with), checked the same way."""
    return _merged(section, schema, where)[1]


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
