"""Shared parsing for study and grid YAML files: search spaces, keys, paths, overrides.

A sweep runs unattended for hours, so every mistake a YAML file can hold (an unknown top-level
key, a search-space key that is not a config key, ``low > high``) is a :class:`ConfigError`
raised before the first trial, naming the key and the closest valid spelling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import OmegaConf

from datamodules.errors import did_you_mean
from datamodules.io import short_hash as io_short_hash
from experiments.config import ConfigError, config_keys, read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
_SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"},
              "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}


def check_keys(data: Dict[str, Any], allowed: Iterable[str], source: str, what: str = "key") -> None:
    """Raise :class:`ConfigError` naming the first key of ``data`` not in ``allowed``."""
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"Unknown {what} '{key}' in {source}.{did_you_mean(str(key), allowed, cutoff=0.5)} "
                              f"Valid: {', '.join(sorted(allowed))}.")


def check_config_key(key: str, source: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` is a dotted leaf key of the config schema."""
    valid = config_keys()
    if key not in valid:
        raise ConfigError(f"'{key}' in {source} is not a config key.{did_you_mean(key, valid, cutoff=0.5)} "
                          "Valid keys are the fields of experiments/config/schema.py.")


def load_yaml(path: str | Path, kind: str) -> Dict[str, Any]:
    """Read a study/grid YAML file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file '{path}' does not exist.")
    data = OmegaConf.to_container(read_yaml(path, kind), resolve=True)
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} file '{path}' must hold a mapping.")
    return data


def resolve_path(value: str, relative_to: Path) -> Path:
    """Find ``value`` as given, relative to the YAML file's folder, or to the repository root."""
    path = Path(value)
    candidates = [path] if path.is_absolute() else [path, relative_to / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"base_config '{value}' not found (tried {', '.join(map(str, candidates))}).")


def format_value(value: Any) -> str:
    """A value as the right-hand side of a dotlist override (YAML syntax)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)  # bools -> true/false, lists -> [..], floats keep full precision


def to_overrides(params: Dict[str, Any]) -> List[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]``."""
    return [f"{key}={format_value(value)}" for key, value in params.items()]


def as_overrides(value: Any, source: str) -> List[str]:
    """Validate a YAML ``overrides`` entry: a list of ``key=value`` strings (None -> [])."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"'overrides' in {source} must be a list of key=value strings, got {value!r}.")
    return list(value)


def overrides_dict(overrides: Sequence[str]) -> Dict[str, str]:
    """Dotlist -> ordered dict of key -> value text; a later override of a key wins."""
    out: Dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value.")
        key, value = item.split("=", 1)
        out.pop(key.strip(), None)
        out[key.strip()] = value.strip()
    return out


def short_hash(payload: Any, n: int = 12) -> str:
    """The project's one hash (:func:`datamodules.io.short_hash`), 12 hex digits for cells and trials."""
    return io_short_hash(payload, n)


@dataclass(frozen=True)
class Param:
    """One search-space dimension over a dotted config key."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[tuple] = None

    def suggest(self, trial: Any) -> Any:
        """Sample this dimension from an ``optuna.Trial``."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))

    def grid_values(self) -> List[Any]:
        """Every value of this dimension, for the grid sampler (floats need a ``step``)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise ConfigError(f"search_space '{self.key}': the grid sampler needs 'step' for floats.")
        step = self.step or 1
        count = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 10) for v in values]


def parse_space(space: Dict[str, Any], source: str) -> List[Param]:
    """Validate a ``search_space`` mapping (dotted config key -> spec) into :class:`Param` list.

    Raises:
        ConfigError: unknown config key, unknown spec field or type, empty/invalid range.
    """
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"'search_space' in {source} must map dotted config keys to specs.")
    params = []
    for key, spec in space.items():
        check_config_key(key, f"search_space of {source}")
        where = f"search_space['{key}'] of {source}"
        if not isinstance(spec, dict) or spec.get("type") not in _SPEC_KEYS:
            raise ConfigError(f"{where} needs 'type': one of {', '.join(_SPEC_KEYS)}.")
        check_keys(spec, _SPEC_KEYS[spec["type"]], where, what="field")
        if spec["type"] == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: 'choices' must be a non-empty list.")
            params.append(Param(key, "categorical", choices=tuple(choices)))
            continue
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: 'low' and 'high' are required for type {spec['type']}.")
        low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
        if not low < high:
            raise ConfigError(f"{where}: 'low' ({low}) must be below 'high' ({high}).")
        if log and (step is not None or low <= 0):
            raise ConfigError(f"{where}: 'log' needs low > 0 and no 'step'.")
        params.append(Param(key, spec["type"], float(low), float(high), log,
                            None if step is None else float(step)))
    return params
