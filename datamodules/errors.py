"""The one exception every datamodule raises for bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a missing, unreadable or inconsistent file or folder.

    The message always names the offending file or folder and says what to do, because a
    sweep runs unattended and its log is often the only thing a user reads.
    """
