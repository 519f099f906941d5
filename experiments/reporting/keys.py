"""The names every reporting module shares: how a tag value and a table key are spelled, and which
metrics say that a segmenter collapsed or that a gate is not to be trusted."""
from __future__ import annotations

from typing import Any

SEG_PREFIXES = ("test/", "val/")  # metrics a collapsed segmenter corrupts
GATE_METRIC, COLLAPSE_METRIC = "gen/real_pass_rate", "seg/collapsed"
# a gate must also reject real pairs made wrong; one that passes them judges nothing
GATE_REJECT_METRICS = ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")


def canon(value: Any) -> str:
    """Canonical text of a tag value, so YAML ``0.7``/``3`` match tags ``"0.7"``/``"3.0"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(int(number)) if number.is_integer() else repr(number)


def column_of(key: str) -> str:
    """DataFrame column of a key: ``params.*``/``metrics.*`` as given, a metric if it has a
    ``/`` (``test/dice``), otherwise a tag (``variant``, ``axis.augment.ratio``)."""
    if key.startswith(("params.", "metrics.", "tags.")):
        return key
    return f"metrics.{key}" if "/" in key else f"tags.{key}"
