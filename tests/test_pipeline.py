"""Stage cache: signatures, reuse, forced recompute, atomic folders."""
import json

import pytest

from experiments.cache import signatures as hashing
from experiments.runner import pipeline
from experiments.config import load_config
from experiments.stages import validate
from lightning_modules.synthesis import copy_paste


class FakeDataModule:
    def write_split(self, path):
        path.write_text("{}")


@pytest.fixture
def calls(monkeypatch):
    """Replace every stage function by one that records its call and writes a file."""
    log = []

    def make(stage):
        def run(cfg, datamodule, workdir, upstream, logger=None):
            log.append(stage)
            assert workdir.name.endswith(".partial")
            assert all((d / "DONE").is_file() for d in upstream.values())
            (workdir / "out.txt").write_text(stage)
            return {f"{stage}/value": float(len(log))}
        return run

    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {stage: make(stage) for stage in pipeline.STAGE_MODULES})
    return log


def _cfg(tmp_path, *overrides):
    return load_config("experiments/configs/procedural_polyp_diffaug.yaml",
                       [f"artifacts_dir={tmp_path}/artifacts", "tracking.enabled=false", *overrides])


def test_required_stages_follow_method(tmp_path):
    assert pipeline.required_stages(_cfg(tmp_path)) == ["finetune", "generate", "validate", "segment"]
    assert pipeline.required_stages(_cfg(tmp_path, "augment.method=copy_paste")) == ["generate", "validate", "segment"]
    assert pipeline.required_stages(_cfg(tmp_path, "augment.method=standard")) == ["segment"]


def test_signatures_change_only_downstream(tmp_path):
    base = pipeline.signatures(_cfg(tmp_path))
    theta = pipeline.signatures(_cfg(tmp_path, "validator.iou_threshold=0.5"))
    ratio = pipeline.signatures(_cfg(tmp_path, "augment.ratio=2"))
    guidance = pipeline.signatures(_cfg(tmp_path, "generation.guidance_scale=7.5"))
    workers = pipeline.signatures(_cfg(tmp_path, "data.num_workers=4", "trainer.devices=2"))
    assert workers == base
    assert theta["generate"] == base["generate"] and theta["validate"] != base["validate"]
    assert ratio["validate"] == base["validate"] and ratio["segment"] != base["segment"]
    assert guidance["finetune"] == base["finetune"] and guidance["generate"] != base["generate"]
    assert theta["segment"] != base["segment"]


def test_new_option_at_its_neutral_value_keeps_old_signatures(tmp_path, monkeypatch):
    base = pipeline.signatures(_cfg(tmp_path))
    # what the signature was before the options existed: the same payload without the keys
    monkeypatch.setitem(hashing.IGNORED, "validator", {"calibrate_real_pass", "calibrate_min_threshold"})
    assert pipeline.signatures(_cfg(tmp_path)) == base
    monkeypatch.undo()
    assert pipeline.signatures(_cfg(tmp_path, "validator.calibrate_min_threshold=0.2")) == base  # inert uncalibrated
    calibrated = pipeline.signatures(_cfg(tmp_path, "validator.calibrate_real_pass=0.8"))
    assert calibrated["generate"] == base["generate"] and calibrated["validate"] != base["validate"]
    floor = pipeline.signatures(_cfg(tmp_path, "validator.calibrate_real_pass=0.8",
                                     "validator.calibrate_min_threshold=0.2"))
    assert floor["validate"] != calibrated["validate"]


def test_copy_paste_version_invalidates_only_copy_paste_generation(tmp_path, monkeypatch):
    runs = {m: _cfg(tmp_path, f"augment.method={m}") for m in ("copy_paste", "diffusion")}
    before = {m: pipeline.signatures(c) for m, c in runs.items()}
    monkeypatch.setattr(copy_paste, "COPY_PASTE_VERSION", copy_paste.COPY_PASTE_VERSION + 1)
    after = {m: pipeline.signatures(c) for m, c in runs.items()}
    assert after["diffusion"] == before["diffusion"]
    assert after["copy_paste"]["generate"] != before["copy_paste"]["generate"]


def test_stage_version_bump_invalidates_that_stage_and_downstream(tmp_path, monkeypatch):
    base = pipeline.signatures(_cfg(tmp_path))
    monkeypatch.setattr(validate, "VERSION", validate.VERSION + 1)
    bumped = pipeline.signatures(_cfg(tmp_path))
    assert bumped["finetune"] == base["finetune"] and bumped["generate"] == base["generate"]
    assert bumped["validate"] != base["validate"] and bumped["segment"] != base["segment"]


def test_cache_reuses_finished_stages(tmp_path, calls):
    dm = FakeDataModule()
    first = pipeline.run_stages(_cfg(tmp_path), datamodule=dm)
    assert calls == ["finetune", "generate", "validate", "segment"]
    assert not any(first.cached.values())
    for stage, folder in first.stage_dirs.items():
        assert json.loads((folder / "DONE").read_text())[f"{stage}/value"] > 0
        assert not folder.with_name(folder.name + ".partial").exists()

    calls.clear()
    second = pipeline.run_stages(_cfg(tmp_path, "augment.ratio=2"), datamodule=dm)
    assert calls == ["segment"]
    assert second.cached == {"finetune": True, "generate": True, "validate": True, "segment": False}
    assert second.metrics["finetune/value"] == first.metrics["finetune/value"]

    calls.clear()
    pipeline.run_stages(_cfg(tmp_path, "augment.ratio=2"), datamodule=dm, force=["validate"])
    assert calls == ["validate"]


def test_targets_limit_what_runs(tmp_path, calls):
    result = pipeline.run_stages(_cfg(tmp_path), targets=["finetune", "generate"], datamodule=FakeDataModule())
    assert calls == ["finetune", "generate"]
    assert set(result.sigs) == {"finetune", "generate"}


def test_failed_stage_leaves_no_done_folder(tmp_path, monkeypatch):
    def boom(cfg, datamodule, workdir, upstream, logger=None):
        (workdir / "half.txt").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {stage: boom for stage in pipeline.STAGE_MODULES})
    cfg = _cfg(tmp_path, "augment.method=standard")
    with pytest.raises(RuntimeError):
        pipeline.run_stages(cfg, datamodule=FakeDataModule())
    sig = pipeline.signatures(cfg)["segment"]
    assert not (tmp_path / "artifacts" / "segment" / sig).exists()
    assert (tmp_path / "artifacts" / "segment" / f"{sig}.partial" / "half.txt").exists()
