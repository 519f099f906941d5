"""Whether the grids a table reads have finished: a table built from a grid that is still running reads
like a final one, so the table command says how many of each grid's cells its numbers rest on.

Which cells a grid defines is the grid runner's knowledge (:mod:`sweeps.grid`, a layer above this one):
the ``meddiffaug table`` command passes it in as ``defined_cells``; called without it (as the
regeneration tests do), nothing is claimed either way.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

DefinedCells = Callable[[str], Optional[Sequence[str]]]  # grid name -> its cell ids, None when unknown


def unfinished_grids(specs: Sequence[Dict[str, Any]], finished_ids: Callable[[str], Sequence[str]],
                     defined_cells: Optional[DefinedCells]) -> Dict[str, Dict[str, int]]:
    """The grids (of every table, each once) with defined cells that have no finished run.

    Args:
        specs: loaded table specs (``sources``: ``(label, grid)`` pairs).
        finished_ids: grid name -> the ``cell`` tags of its FINISHED runs.
        defined_cells: grid name -> the cell ids its grid file defines, or None when unknown.

    Returns:
        ``{grid: {"finished": n, "defined": m}}`` for each grid with n < m, in the tables' order.
    """
    if defined_cells is None:
        return {}
    out: Dict[str, Dict[str, int]] = {}
    grids = dict.fromkeys(grid for spec in specs for _, grid in spec["sources"])
    for grid in grids:
        defined = defined_cells(grid)
        if not defined:
            continue
        finished = len(set(defined) & set(map(str, finished_ids(grid))))
        if finished < len(set(defined)):
            out[grid] = {"finished": finished, "defined": len(set(defined))}
    return out


def interim_finding(unfinished: Dict[str, Dict[str, int]]) -> List[str]:
    """The findings line that opens an interim table (nothing when every grid is complete)."""
    if not unfinished:
        return []
    parts = ", ".join(f"`{grid}` {n['finished']} of {n['defined']}" for grid, n in unfinished.items())
    return [f"Interim: these grids have not finished ({parts} cells); every number below may change when "
            "they do (`meddiffaug grid sweeps/grids/GRID.yaml --status` shows what is left)."]
