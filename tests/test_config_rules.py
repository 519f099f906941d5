"""Every table of config facts names keys the schema has: a misspelt key would be skipped silently."""
from __future__ import annotations

import pytest

from experiments.cache import signatures as hashing
from experiments.config import Config, config_keys
from experiments.config import ranges as config_ranges
from experiments.config import rules

KEYS = set(config_keys())


def _dotted(table):
    return {f"{section}.{key}" for section, keys in table.items() for key in keys}


@pytest.mark.parametrize("name, keys", [
    ("config_ranges.INT_RANGES", set(config_ranges.INT_RANGES)),
    ("config_ranges.FLOAT_RANGES", set(config_ranges.FLOAT_RANGES)),
    ("rules.CHOICES", set(rules.CHOICES)),
    ("hashing.IGNORED", _dotted(hashing.IGNORED)),
    ("hashing.NEUTRAL", _dotted(hashing.NEUTRAL)),
])
def test_rule_tables_name_schema_keys(name, keys):
    assert not keys - KEYS, f"{name} names keys the schema lacks: {sorted(keys - KEYS)}"


def test_neutral_values_are_the_schema_defaults():
    """A key left out of signatures at its neutral value must default to it, or every cached stage of
    a config that does not set it would be recomputed (or, worse, a changed default reused)."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.structured(Config)
    wrong = {f"{s}.{k}": (v, OmegaConf.select(defaults, f"{s}.{k}"))
             for s, keys in hashing.NEUTRAL.items() for k, v in keys.items()
             if OmegaConf.select(defaults, f"{s}.{k}") != v}
    assert not wrong, f"neutral value vs schema default: {wrong}"
