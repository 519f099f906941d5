"""``meddiffaug demo``: the main job on procedural data, end to end, then the headline.

Runs the demo grid (fine-tune the shipped tiny base on 16 procedural polyp pairs, generate, gate,
train the segmenter real-only / copy-paste / diffusion for 3 paired seeds; finished cells are
reused), prints the table with the paired 95 % CI of the Dice gain, and says where to look.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

# Resolved from the installed package, so `meddiffaug demo` runs from any working directory; its
# outputs (outputs/, artifacts/) go under the current directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRID = str(PROJECT_ROOT / "sweeps/grids/demo.yaml")
TABLE = str(PROJECT_ROOT / "experiments/tables/demo.yaml")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo grid and print its table and headline."""
    parser = argparse.ArgumentParser(prog="meddiffaug demo", description=main.__doc__)
    parser.add_argument("--grid", default=GRID)
    parser.add_argument("--table", default=TABLE)
    parser.add_argument("--out", default="outputs/demo", help="where results.md/json of the demo go")
    parser.add_argument("--workers", type=int, default=2, help="grid processes (one per core is fastest)")
    args = parser.parse_args(argv)
    from experiments.reporting import table_cli as table
    from sweeps import grid

    # The demo's run records sit beside its MLflow store under outputs/, not in the checkout's
    # sweeps/records/ (which holds the committed records of the paper tables): deleting outputs/
    # then reruns the demo instead of leaving records of runs whose store is gone.
    os.environ.setdefault("MEDDIFFAUG_RECORDS_DIR", str(Path("outputs") / "records"))
    start = time.time()
    status = grid.main([args.grid, "--workers", str(args.workers)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.main([args.table, "--write", str(out / "results.md"), "--json", str(out / "results.json"), "--no-log"])
    print((out / "results.md").read_text())
    headline = json.loads((out / "results.json").read_text()).get("headline", {})
    print("Headline:", json.dumps(headline, indent=2))
    print(f"\nDemo finished in {time.time() - start:.0f} s. Results: {out}/results.md, {out}/results.json, "
          f"stage outputs (sample grids, accepted/rejected pictures, predictions) under artifacts/.")
    print_where_to_look()
    return status


def print_where_to_look() -> None:
    """Print the command that starts the UI and the address of the demo's runs table."""
    from experiments.ui import DEFAULT_STORE, experiment_id_of, runs_table_url

    store = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    ui = Path(sys.executable).parent / "meddiffaug"
    print(f"See every run in MLflow:  {ui} ui   (store {store}), then open")
    print(f"  {runs_table_url('127.0.0.1', 5000, experiment_id_of(store, 'demo'))}")
