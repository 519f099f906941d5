"""The console script: subcommands in-process, errors as messages, a tiny end-to-end run."""
import json
from pathlib import Path

import pytest

from sweeps.cli import main

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.n_procedural=40", "data.image_size=32",
        "data.batch_size=4", "data.n_real=8",
        "segmenter.collapse_dice=0"]  # 4 steps may not beat the collapse line; exit 3 is tested elsewhere


def _isolated(tmp_path):
    return [f"artifacts_dir={tmp_path}/artifacts", f"output_dir={tmp_path}/outputs",
            f"data.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/mlruns"]


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "run CONFIG" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_run_rejects_misspelt_key_with_suggestion(capsys):
    code = main(["run", "experiments/configs/procedural_polyp_baseline.yaml", "generation.guidnce_scale=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "generation.guidnce_scale" in err and "generation.guidance_scale" in err


def test_run_rejects_unknown_stage(capsys):
    assert main(["run", "experiments/configs/procedural_polyp_baseline.yaml", "--stages", "segment,train"]) == 2
    assert "train" in capsys.readouterr().err


def test_run_rejects_unknown_dataset(tmp_path, capsys):
    code = main(["run", "experiments/configs/procedural_polyp_baseline.yaml", "data.name=kvasir", *_isolated(tmp_path)])
    assert code == 2
    assert "kvasir_seg" in capsys.readouterr().err


@pytest.mark.slow
def test_baseline_run_end_to_end_then_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["run", "experiments/configs/procedural_polyp_baseline.yaml", *TINY, *_isolated(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.rindex("\n{") + 1:])
    assert 0.0 <= out["metrics"]["test/dice"] <= 1.0
    sig = out["sigs"]["segment"]
    stage_dir = tmp_path / "artifacts" / "segment" / sig
    assert (stage_dir / "DONE").is_file() and (stage_dir / "predictions.png").is_file()
    assert not list(stage_dir.rglob("*.ckpt")), "checkpoints are resume state and are removed when done"
    assert list((tmp_path / "outputs" / "splits").glob("*.json"))

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["procedural_polyp_baseline"])
    assert len(runs) == 1 and runs.iloc[0]["tags.sig"] == sig
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "segment")]
    assert "segment/predictions.png" in artifacts
    # The UI opens on the runs table (model training), and the Dataset column names each split.
    experiment = mlflow.get_experiment_by_name("procedural_polyp_baseline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = mlflow.get_run(runs.iloc[0]["run_id"]).inputs.dataset_inputs
    by_split = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_split) == {"train_few", "val", "test"}
    assert by_split["test"].name == "procedural_polyp/test" and len(by_split["test"].digest) == 16
    assert by_split["test"].digest != by_split["val"].digest

    assert main(args) == 0  # second run: reused from the stage cache
    assert "cached at" in capsys.readouterr().out



@pytest.mark.slow
@pytest.mark.parametrize("config", ["procedural_polyp_diffaug", "procedural_polyp_copy_paste", "procedural_polyp_meddiff_ft"])
def test_augmented_pipeline_end_to_end(tmp_path, capsys, monkeypatch, config):
    """Every stage on the shipped tiny base, shrunk to seconds; synthetic pairs reach the segmenter."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["run", f"experiments/configs/{config}.yaml", *TINY, "data.image_size=64", "diffusion.steps=4",
            "diffusion.batch_size=4", "generation.n_samples=6", "generation.steps=3", "generation.batch_size=6",
            "validator.train_steps=4", "validator.iou_threshold=0.0",
            "validator.quality_filter=false", *_isolated(tmp_path)]  # a 4-step model makes near-copies
    assert main(args) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.rindex("\n{") + 1:])
    assert out["metrics"]["gen/n_samples"] == 6
    assert 0.0 <= out["metrics"]["gen/accept_rate"] <= 1.0 and "gen/real_pass_rate" in out["metrics"]
    validate_dir = tmp_path / "artifacts" / "validate" / out["sigs"]["validate"]
    accepted = [json.loads(line) for line in (validate_dir / "accepted.jsonl").read_text().splitlines()]
    assert len(accepted) == 6, "θ = 0 and no quality filter accept every sample"
    for row in accepted:  # paths stay valid after the stage folder was renamed into place
        assert (validate_dir / row["mask"]).is_file() and Path(row["image"]).is_file()
    assert "test/dice" in out["metrics"]
