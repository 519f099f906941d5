"""The names every reporting module shares: how a tag value and a table key are spelled, and which
metrics say that a segmenter collapsed or that a gate is not to be trusted."""
from __future__ import annotations

from typing import Any

import pandas as pd

SEG_PREFIXES = ("test/", "val/")  # metrics a collapsed segmenter corrupts
GATE_METRIC, COLLAPSE_METRIC = "gen/real_pass_rate", "seg/collapsed"
# a gate must also reject real pairs made wrong; one that passes them judges nothing
GATE_REJECT_METRICS = ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")
CROSSFIT_METRIC = "gen/crossfit_folds"  # K > 0: the gate's real rates are cross-fitted over all labelled pairs
# A table names each grid's external test set (data.external_tests, logged as test/<set>/<metric>);
# its metrics are read under one name, test/external/<metric>, so rows of several grids share columns.
EXTERNAL_PREFIX = "test/external/"


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


def with_external(runs: pd.DataFrame, external_set: str) -> pd.DataFrame:
    """``runs`` with ``metrics.test/external/<m>`` columns copied from ``metrics.test/<external_set>/<m>``
    (runs that did not measure the set keep NaN there: "not measured")."""
    own = f"metrics.test/{external_set}/"
    copies = {f"metrics.{EXTERNAL_PREFIX}{c[len(own):]}": runs[c] for c in runs.columns if c.startswith(own)}
    return runs.assign(**copies) if copies else runs
