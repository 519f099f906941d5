"""Loading a config: ``OmegaConf.merge(schema defaults, YAML file, CLI dotlist)``, then its rules.

The schema is structured, so an unknown or misspelt key raises :class:`ConfigError` naming the key
and the closest valid one: a sweep runs unattended, and a typo must not silently do nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from datamodules.errors import did_you_mean
from experiments.config.rules import resolve_budget, validate
from experiments.config.schema import Config, ConfigError


def _valid_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(_valid_keys(value, dotted + "."))
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    valid = _valid_keys(OmegaConf.structured(Config))
    hint = did_you_mean(key, valid, cutoff=0.5)
    return ConfigError(f"Unknown config key '{key}' in {source}.{hint} Valid keys are listed in experiments/config/schema.py.")


def _check_keys(data: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Raise on the first key of ``data`` that the schema does not define."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(dotted, source)
        child = schema[key]
        if isinstance(child, DictConfig):
            _check_keys(value, child, source, dotted + ".")


def read_yaml(path: str | Path, kind: str = "Config") -> Any:
    """Parse a YAML file with OmegaConf; a syntax error or an unreadable file is a ConfigError.

    The message names the file, the line and column of a syntax error, and what to do.
    """
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{kind} file '{path}'{where}: YAML syntax error ({problem}); fix the "
                          f"file (mind indentation, ':' after each key and matching quotes/brackets).") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{kind} file '{path}' is not UTF-8 text ({err.reason}); save it as UTF-8.") from err
    except OSError as err:
        raise ConfigError(f"cannot read {kind.lower()} file '{path}' ({err.strerror or err}); make it readable "
                          f"by you (e.g. chmod u+r) or copy it somewhere you can read.") from err


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                overrides_source: str = "the command line") -> DictConfig:
    """Merge schema defaults, an optional YAML file and dotlist overrides.

    Args:
        path: YAML experiment file; its keys must exist in :class:`Config`.
        overrides: ``key=value`` strings, e.g. ``["generation.guidance_scale=5"]``.
        overrides_source: Where the overrides came from, named in errors (e.g. a grid file).

    Returns:
        The resolved, read-only-keyed config.

    Raises:
        ConfigError: unknown key, malformed override, wrong value type, missing file.
    """
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Pass a YAML file such as experiments/configs/procedural_polyp_baseline.yaml.")
        raw = OmegaConf.to_container(read_yaml(path), resolve=False) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, trainer:, ...), "
                              f"not a {type(raw).__name__}.")
        _check_keys(raw, schema, str(path))
        merged = _merge(merged, OmegaConf.create(raw), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' in {overrides_source} is not of the form key=value "
                              f"(e.g. trainer.max_epochs=5).")
        merged = _merge(merged, _dotlist(item, overrides_source), overrides_source)
    resolve_budget(merged)
    validate(merged)
    return merged


def _dotlist(item: str, source: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([item])
    except Exception as err:  # omegaconf's grammar errors (e.g. an unclosed bracket) share no base class
        raise ConfigError(f"Override '{item}' in {source} cannot be parsed ({str(err).splitlines()[0]}); "
                          f"quote or fix its value (e.g. key='[1, 2]').") from err


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key or err.key), source) from err
    except ValidationError as err:
        raise ConfigError(f"Invalid value for '{err.full_key}' in {source}: {err.msg.splitlines()[0]}") from err


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (logged to MLflow as ``config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_keys() -> List[str]:
    """Every dotted leaf key of the config schema (``validator.iou_threshold`` ...)."""
    keys: List[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node:
            value = node._get_node(name)
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    walk(OmegaConf.structured(Config), "")
    return keys
