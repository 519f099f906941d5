"""The one exception every datamodule raises for bad input data."""

from __future__ import annotations

import difflib
from typing import Iterable


class DataError(ValueError):
    """Bad input data: a missing, unreadable or inconsistent file or folder.

    The message always names the offending file or folder and says what to do, because a
    sweep runs unattended and its log is often the only thing a user reads.
    """


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """The " Did you mean 'x'?" suffix of an unknown-name error, or "" when nothing is close.

    Every "unknown key/name" message in the suite ends the same way, so a typo in a YAML file
    or a dataset name points at the spelling the user most likely meant.

    Args:
        name: The unknown name as the user wrote it.
        choices: The valid names (order breaks ties between equally close names).
        cutoff: ``difflib.get_close_matches`` similarity threshold in [0, 1].

    Returns:
        ``" Did you mean 'x'?"`` for the closest valid name, else ``""``.
    """
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""
