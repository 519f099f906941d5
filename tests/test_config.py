"""Config schema: YAML + dotlist merge, and errors that name the bad key."""
import pytest

from experiments.config import ConfigError, load_config


def test_defaults_and_overrides_merge():
    cfg = load_config("experiments/configs/procedural_polyp_baseline.yaml",
                      ["trainer.max_epochs=3", "data.n_real=null", "generation.guidance_scale=5"])
    assert cfg.trainer.max_epochs == 3
    assert cfg.data.n_real is None
    assert cfg.generation.guidance_scale == 5.0
    assert cfg.data.name == "procedural_polyp"


@pytest.mark.parametrize("override, named, suggestion", [
    ("generation.guidnce_scale=5", "generation.guidnce_scale", "generation.guidance_scale"),
    ("trainr.max_epochs=2", "trainr", "trainer"),
    ("validator.iou_treshold=0.5", "validator.iou_treshold", "validator.iou_threshold"),
])
def test_unknown_override_names_key_and_closest(override, named, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert named in str(err.value) and suggestion in str(err.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  nam: kvasir_seg\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.nam" in str(err.value) and str(path) in str(err.value) and "data.name" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("augment.method=mixup", "augment.method"),
    ("validator.iou_threshold=1.5", "validator.iou_threshold"),
    ("stages=[segment,train]", "stages"),
    ("validator.calibrate_real_pass=0", "validator.calibrate_real_pass"),
    ("validator.calibrate_real_pass=0.8;validator.early_reject_t=100", "validator.early_reject_t"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split(";"))
    assert key in str(err.value)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.max_epochs"])


def test_every_shipped_config_loads():
    from pathlib import Path

    for path in sorted(Path("experiments/configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem, path
