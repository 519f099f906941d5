"""Progress bars for the long loops outside Lightning's trainers (latent caches, gate data, scoring).

A bar on a terminal only: in a log file or a CI job every redraw would be a line of noise, so there the
loop prints nothing and the caller writes one line when it ends.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """Whether stderr (where tqdm draws) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "it") -> Iterable:
    """``iterable`` wrapped in a tqdm bar on a terminal, unchanged elsewhere."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not on_terminal())
