"""Whether output goes to a terminal: bars redraw in place there, and would be a line each in a file.

No heavy import here: the command line asks before any library that draws bars is loaded.
"""
import sys


def on_terminal() -> bool:
    """True when stdout and stderr are both terminals (bars then redraw in place)."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))
