"""The power statement of a pre-registered block, from the paired spread of block 100's records.

``python -m sweeps.preregistration.power [--effect 0.03] [--seeds 20] [--family 4] [--records sweeps/records]``

For each modality, the per-seed test-Dice differences diffusion + gate − copy-paste of block 100
(``sweeps/records/headline_<modality>.jsonl``, arms ``diffusion_gate`` and ``copy_paste``, paired by
seed) give the SD of a paired difference. Printed per modality (one JSON line): that SD, its number of
pairs, the power of a two-sided paired t-test over ``--seeds`` pairs to find a true difference of
``--effect`` at α = 0.05 / ``--family`` (Holm's strictest step over the primary comparisons) and at 0.05,
and the seeds that 80 % power would take at the strict α.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.reporting.run_records import finished_records
from experiments.reporting.stats import paired_power

MODALITIES = ("polyp", "skin", "fundus", "ultrasound")


def paired_differences(path: Path, arm: str = "diffusion_gate", control: str = "copy_paste",
                       metric: str = "test/dice") -> np.ndarray:
    """``arm − control`` of ``metric`` for every seed where both finished in the grid records at ``path``."""
    by_seed: dict = {}
    for record in finished_records(path.stem, path):
        value = record.get("metrics", {}).get(metric)
        if value is not None:
            by_seed.setdefault(str(record["seed"]), {})[record["variant"]] = float(value)
    return np.array([v[arm] - v[control] for v in by_seed.values() if arm in v and control in v])


def seeds_for(power: float, effect: float, sd: float, alpha: float, most: int = 2000) -> int:
    """The fewest pairs with at least ``power`` at ``effect`` (``most`` + 1 when even that is short)."""
    return next((n for n in range(2, most + 1) if paired_power(effect, sd, n, alpha) >= power), most + 1)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m sweeps.preregistration.power", description=__doc__.splitlines()[0])
    parser.add_argument("--effect", type=float, default=0.03, help="true Dice difference to be found")
    parser.add_argument("--seeds", type=int, default=20, help="paired seeds of the new block")
    parser.add_argument("--family", type=int, default=4, help="primary comparisons under Holm's correction")
    parser.add_argument("--records", default="sweeps/records", help="folder of block 100's run records")
    args = parser.parse_args(argv)
    strict = 0.05 / args.family
    rows = []
    for modality in MODALITIES:
        path = Path(args.records) / f"headline_{modality}.jsonl"
        diffs = paired_differences(path)
        if len(diffs) < 2:
            raise SystemExit(f"{path}: {len(diffs)} seeds with both diffusion_gate and copy_paste finished; "
                             f"the SD of a paired difference needs 2 or more (pass --records with block 100's records)")
        sd = float(diffs.std(ddof=1))
        rows.append({"modality": modality, "pairs_block100": len(diffs), "mean_diff_block100": round(float(diffs.mean()), 4),
                     "sd_diff": round(sd, 4), "effect": args.effect, "seeds": args.seeds, "alpha": strict,
                     "power": round(paired_power(args.effect, sd, args.seeds, strict), 3),
                     "power_alpha_0.05": round(paired_power(args.effect, sd, args.seeds, 0.05), 3),
                     "seeds_for_80pct": seeds_for(0.8, args.effect, sd, strict)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
