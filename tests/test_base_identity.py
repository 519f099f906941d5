"""A diffusion base enters signatures by its content: re-pretraining it recomputes, moving it does not."""
import shutil

from experiments.cache.base_identity import TINY_FOLDER, base_identity


def _copy_base(tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(TINY_FOLDER, folder)
    return folder


def test_same_content_at_another_path_is_the_same_base(tmp_path):
    assert base_identity(str(_copy_base(tmp_path, "a"))) == base_identity(str(_copy_base(tmp_path, "b")))
    assert base_identity(str(_copy_base(tmp_path, "c"))) == base_identity("tiny")


def test_changed_weights_or_config_make_another_base(tmp_path):
    original = base_identity(str(_copy_base(tmp_path, "a")))
    retrained = _copy_base(tmp_path, "b")
    weights = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other weights
    weights.write_bytes(bytes(data))
    changed = base_identity(str(retrained))
    assert changed != original
    (retrained / "MODEL_CARD.md").write_text("documentation only")  # the card is not the model
    base_identity.cache_clear()
    assert base_identity(str(retrained)) == changed


def test_missing_folder_has_no_identity(tmp_path):
    assert base_identity(str(tmp_path / "absent")) == {}


def test_finetune_signature_follows_the_base_content_not_its_path(tmp_path):
    from experiments.config import load_config
    from experiments.runner.pipeline import signatures

    def sig(base):
        cfg = load_config("experiments/configs/procedural_polyp_diffaug.yaml",
                          [f"diffusion.base_model={base}", "tracking.enabled=false"])
        return signatures(cfg)["finetune"]

    a, b = _copy_base(tmp_path, "a"), _copy_base(tmp_path, "b")
    assert sig(a) == sig(b)
    weights = b / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    base_identity.cache_clear()
    assert sig(a) != sig(b)
