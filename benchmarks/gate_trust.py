"""Can the latent gate be trusted at 16 labels? Its in-run self-check against the truth on held-out pairs.

``python -m benchmarks.gate_trust [--modalities polyp fundus skin ultrasound] [--seeds 300 ... 309]
[--heldout 200] [--gates prompted plain pasted pasted_q0.9 features] [--folds 4] [--records DIR] [key=value ...]``

For each procedural modality, gate and seed, a run with n_real = 16 labelled pairs (12 ``train_few`` +
4 ``val``, the headline grids' budget and seed keys) trains the gate as the validate stage does
(``validator.mode=single_step``, θ = 0.7 calibrated to ``calibrate_real_pass=0.8`` with floor 0.05):

* **in run** (what the user sees): ``validator.crossfit_folds`` folds over the 16 labelled pairs
  (:mod:`experiments.stages.validate.crossfit`): the cross-fitted real pass rate, θ and the flag;
* **truth** (what the user never has): the run's gate (validator on ``train_few``, that θ) on
  ``--heldout`` lesion pairs of a reserved procedural stream, as they are, misplaced and missing.

The ensemble of the K fold validators (trained for the check anyway) is judged on the same pairs at the
same θ as gate ``<gate>+ensemble``; its in-run figures are the single validators' cross-fitted ones.

Prints one JSON line per modality and gate: ``real_pass_rate``, ``misplaced_reject_rate`` and
``missing_reject_rate`` on the held-out pairs (means over seeds, each with a ``_ci95`` t-interval over
seeds), ``selfcheck_error`` (mean |in-run cross-fitted real pass − held-out real pass|) and
``flagged_share`` (share of runs whose in-run check flags the gate).

Each seed's result is kept as one JSON file under ``--records`` (default :data:`RECORDS`, committed with
the code, each naming the commit that made it); a seed whose file exists is read, not rerun, so a long
run resumes where it stopped and the printed lines can be rebuilt from the files alone.

No fine-tuned diffusion model: the gate's ε̂ comes from the tiny shipped base (``diffusion.finetune=none``,
as a copy-paste run's gate does). The validator is trained on real pairs only and judged here on real
pairs only, so no generated sample and no fine-tune enters the measurement; a run's own gate uses its
fine-tuned UNet for the single-step estimate, which this benchmark does not measure (it keeps one
benchmark cell at ~4 validator trainings per seed on a CPU core instead of adding a LoRA fine-tune).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys

import numpy as np
from scipy import stats

MODALITIES = ("polyp", "fundus", "skin", "ultrasound")
# gate name -> its overrides. prompted: the suite's validator (sees the intended mask); plain: DiffAug's
# (segments from the latent alone); pasted: also trains on 64 labelled lesions pasted into 64 lesion-free
# pool images (not for fundus: every retina shows a disc, so it has no lesion-free pool)
GATES = {"prompted": ["validator.prompted=true"], "plain": ["validator.prompted=false"],
         "pasted": ["validator.prompted=true", "data.n_normal=64", "validator.pasted_pairs=64"],
         # the same validator at an operating point that passes 90 % of the cross-fitted real pairs: a gate
         # calibrated to pass 80 % is flagged (real pass < 0.8) by the check's own noise about half the time
         "pasted_q0.9": ["validator.prompted=true", "data.n_normal=64", "validator.pasted_pairs=64",
                         "validator.calibrate_real_pass=0.9"]}
# features: a pixel classifier on the UNet's decoder features of the single-step call (no prompt), at t = 50,
# where the sample is least noised
GATES["features"] = ["validator.features=unet_decoder", "validator.t_eval=50"]
NEEDS_POOL = {"pasted", "pasted_q0.9"}
SEED_KEYS = ("seed", "data.split_seed", "data.procedural_seed", "augment.seed", "generation.seed")
CONFIG = "experiments/configs/procedural_polyp_diffaug.yaml"
RECORDS = "benchmarks/records/gate_trust"


def run_config(modality: str, gate: str, seed: int, folds: int, extra=()):
    """The config of one benchmark run (a headline-grid budget with the gate of ``gate``, then ``extra``)."""
    from experiments.config import load_config

    overrides = [f"data.name=procedural_{modality}", "data.n_real=16", "data.n_val=4", "tracking.enabled=false",
                 "diffusion.finetune=none", "validator.mode=single_step", "validator.iou_threshold=0.7",
                 "validator.calibrate_real_pass=0.8", f"validator.crossfit_folds={folds}"]
    return load_config(CONFIG, overrides + GATES[gate] + [f"{k}={seed}" for k in SEED_KEYS] + list(extra))


def mean_ci(values) -> tuple:
    """Mean and the half-width of its 95 % t-interval over the values (NaN half-width for one value)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(modality: str, gate: str, runs: list, heldout: int, truth: str = "heldout") -> dict:
    """The JSON line of one modality and gate from its runs' :func:`judge_run` results (``truth``: which
    held-out rates: the run's gate, ``heldout``, or the fold validators' ensemble, ``heldout_ensemble``)."""
    row = {"benchmark": "gate_trust", "modality": modality, "gate": gate, "n_real": 16, "seeds": len(runs),
           "heldout_pairs": heldout}
    for key in ("real_pass_rate", "misplaced_reject_rate", "missing_reject_rate"):
        mean, ci = mean_ci([r[truth][key] for r in runs])
        row[key], row[f"{key}_ci95"] = round(mean, 4), None if math.isnan(ci) else round(ci, 4)
    row["selfcheck_error"] = round(float(np.mean([abs(r["in_run"]["real_pass_rate"] - r[truth]["real_pass_rate"])
                                                  for r in runs])), 4)
    row["flagged_share"] = round(float(np.mean([r["flagged"] for r in runs])), 4)
    row["in_run_real_pass_rate"] = round(float(np.mean([r["in_run"]["real_pass_rate"] for r in runs])), 4)
    row["in_run_lesion_pairs"] = round(float(np.mean([r["in_run"]["n_lesion_pairs"] for r in runs])), 2)
    row["theta"] = round(float(np.mean([r["theta"] for r in runs])), 4)
    return row


def markdown_table(rows: list) -> str:
    """The lines as the table of docs/gate-trust.md: rates as mean ± ``_ci95``, then the in-run figures."""
    def rate(row, key):
        ci = row[f"{key}_ci95"]
        return f"{row[key]:.3f}" + ("" if ci is None else f" ± {ci:.3f}")

    out = ["| modality | gate | seeds | real pass | misplaced reject | missing reject | self-check error | flagged "
           "| in-run real pass | θ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rates = " | ".join(rate(r, k) for k in ("real_pass_rate", "misplaced_reject_rate", "missing_reject_rate"))
        out.append(f"| {r['modality']} | {r['gate']} | {r['seeds']} | {rates} | {r['selfcheck_error']:.3f} | "
                   f"{r['flagged_share']:.2f} | {r['in_run_real_pass_rate']:.3f} | {r['theta']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_trust", description=__doc__.splitlines()[0])
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(300, 310)))
    parser.add_argument("--heldout", type=int, default=200, help="held-out real lesion pairs per seed")
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--folds", type=int, default=4, help="validator.crossfit_folds of the in-run check")
    parser.add_argument("--records", default=RECORDS, help="folder of the per-seed result files (read, then written)")
    parser.add_argument("--table", action="store_true", help="print a Markdown table of the lines instead of JSON")
    parser.add_argument("--recorded-only", action="store_true",
                        help="summarise the seeds that have a record; run nothing")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides (every run)")
    args = parser.parse_args(argv)
    from benchmarks.gate_trust_run import judge_run_once

    rows = []
    for modality in args.modalities:
        for gate in args.gates:
            if gate in NEEDS_POOL and modality == "fundus":
                print(f"[gate_trust] {modality} {gate}: skipped (no lesion-free pool)", file=sys.stderr, flush=True)
                continue
            runs = []
            for seed in args.seeds:
                config = functools.partial(run_config, modality, gate, seed, args.folds, args.overrides)
                key = {"modality": modality, "gate": gate, "seed": seed, "folds": args.folds,
                       "heldout": args.heldout, "overrides": list(args.overrides)}
                with contextlib.redirect_stdout(sys.stderr):  # training logs; stdout holds the JSON lines
                    result = judge_run_once(config, key, args.records, run=not args.recorded_only)
                runs += [result] if result is not None else []
            if not runs:
                print(f"[gate_trust] {modality} {gate}: no recorded seed", file=sys.stderr, flush=True)
                continue
            for name, truth in ((gate, "heldout"), (f"{gate}+ensemble", "heldout_ensemble")):
                rows.append(summarize(modality, name, runs, args.heldout, truth))
                print(json.dumps(rows[-1]), flush=not args.table, file=sys.stderr if args.table else sys.stdout)
    if args.table:
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
