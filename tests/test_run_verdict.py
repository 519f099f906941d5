"""A run whose numbers measure nothing says so and exits 3; caveats are printed, exit 0."""
import pytest

from sweeps.cli import main
from experiments.config import load_config
from experiments.runner.pipeline import PipelineResult
from experiments.runner.run_verdict import EXIT_NOT_A_RESULT, run_verdicts

DIFFAUG = "experiments/configs/procedural_polyp_diffaug.yaml"
BASELINE = "experiments/configs/procedural_polyp_baseline.yaml"
HEALTHY = {"val/dice": 0.41, "test/dice": 0.38, "seg/collapsed": 0.0, "gen/n_samples": 64.0,
           "gen/n_accepted": 20.0, "gen/gate_flagged": 0.0, "gen/real_pass_rate": 0.9}


def test_a_healthy_run_has_no_verdict():
    assert run_verdicts(load_config(DIFFAUG, []), HEALTHY) == ([], [])


@pytest.mark.parametrize("val_dice, seen", [(0.012, "0.012"), (float("nan"), "no validation Dice")])
def test_a_collapsed_segmenter_is_not_a_result(val_dice, seen):
    not_a_result, _ = run_verdicts(load_config(BASELINE, []), {"val/dice": val_dice, "test/dice": 0.0,
                                                                "seg/collapsed": 1.0})
    assert len(not_a_result) == 1 and seen in not_a_result[0] and "segmenter.collapse_dice=0.05" in not_a_result[0]


def test_an_augmented_run_without_accepted_pairs_is_real_only():
    metrics = {**HEALTHY, "gen/n_accepted": 0.0}
    not_a_result, _ = run_verdicts(load_config(DIFFAUG, []), metrics)
    assert len(not_a_result) == 1 and "none of the 64 synthetic pairs" in not_a_result[0]
    # not an augmented run, no segment stage, or ratio 0: nothing was promised, nothing is wrong
    assert run_verdicts(load_config(DIFFAUG, ["augment.method=standard"]), metrics)[0] == []
    assert run_verdicts(load_config(DIFFAUG, ["augment.ratio=0"]), metrics)[0] == []
    assert run_verdicts(load_config(DIFFAUG, []), {"gen/n_accepted": 0.0})[0] == []


def test_a_flagged_gate_is_a_caveat_not_a_failure():
    not_a_result, caveats = run_verdicts(load_config(DIFFAUG, []), {**HEALTHY, "gen/gate_flagged": 1.0,
                                                                     "gen/real_pass_rate": 0.45})
    assert not_a_result == [] and len(caveats) == 1 and "passes only 45% of REAL" in caveats[0]
    # flagged for passing wrong pairs, while real pairs pass: the caveat says that, not a pass rate
    weak = {**HEALTHY, "gen/gate_flagged": 1.0, "gen/real_misplaced_reject_rate": 0.2, "gen/real_missing_reject_rate": 0.9}
    (caveat,) = run_verdicts(load_config(DIFFAUG, []), weak)[1]
    assert "rejects fewer than half of the real pairs made wrong (misplaced lesions)" in caveat
    assert run_verdicts(load_config(DIFFAUG, ["validator.calibrate_real_pass=0.8"]),
                        {**HEALTHY, "gen/gate_flagged": 1.0, "gen/real_pass_rate": 0.45})[1][0].endswith("(gen/gate_flagged=1).")


@pytest.mark.parametrize("metrics, code, phrase", [
    (HEALTHY, 0, None),
    ({**HEALTHY, "gen/gate_flagged": 1.0, "gen/real_pass_rate": 0.5}, 0,
     "meddiffaug run: warning: the single_step gate passes only 50%"),
    ({**HEALTHY, "val/dice": 0.01, "seg/collapsed": 1.0}, EXIT_NOT_A_RESULT, "meddiffaug run: not a result: the segmenter collapsed"),
    ({**HEALTHY, "gen/n_accepted": 0.0}, EXIT_NOT_A_RESULT, "meddiffaug run: not a result: augment.method=diffusion"),
])
def test_run_exit_code_follows_the_verdict(monkeypatch, capsys, metrics, code, phrase):
    from experiments.runner import pipeline, preflight

    monkeypatch.setattr(preflight, "preflight", lambda cfg: None)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, **kw: PipelineResult(metrics=dict(metrics), run_id="r1"))
    assert main(["run", DIFFAUG]) == code
    out, err = capsys.readouterr()
    assert '"test/dice"' in out, "the metrics are printed whatever the verdict"
    if phrase is None:
        assert err == ""
    else:
        assert phrase in err and "Traceback" not in err
    if code:
        assert "MLflow run r1" in err and f"exit {EXIT_NOT_A_RESULT}" in err
