"""Real-data defaults fail fast or announce themselves; exit 3 names what rejected the samples."""
import pytest

from experiments.config import ConfigError, load_config
from experiments.cache.signatures import subtree
from experiments.runner.preflight import check_base
from experiments.runner.run_verdict import run_verdicts
from fakes import ArrayDataModule

KVASIR = "experiments/configs/kvasir_seg_diffaug.yaml"
DIFFAUG = "experiments/configs/procedural_polyp_diffaug.yaml"
HEALTHY = {"val/dice": 0.41, "test/dice": 0.38, "seg/collapsed": 0.0, "gen/n_samples": 64.0,
           "gen/n_accepted": 20.0, "gen/gate_flagged": 0.0, "gen/real_pass_rate": 0.9}


def test_the_tiny_base_at_a_real_size_fails_before_anything_loads():
    with pytest.raises(ConfigError) as err:
        check_base(load_config(KVASIR, ["data.root=/nowhere"]))
    message = str(err.value)
    assert "trained at 64 px" in message and "diffusion.base_model=<local SD inpainting folder>" in message
    assert "diffusion.allow_upscaled_tiny=true" in message
    # asked for explicitly, or at the size it was trained for: allowed
    assert check_base(load_config(KVASIR, ["data.root=/nowhere", "diffusion.allow_upscaled_tiny=true"])) is not None
    assert check_base(load_config(KVASIR, ["data.root=/nowhere", "data.image_size=64"])) is not None


def test_allowing_the_upscaled_tiny_base_changes_no_signature():
    plain, allowed = (subtree(load_config(DIFFAUG, over), "diffusion")
                      for over in ([], ["diffusion.allow_upscaled_tiny=true"]))
    assert plain == allowed and "allow_upscaled_tiny" not in plain


def test_normal_sources_on_lesion_bearing_images_are_announced(tmp_path):
    from experiments.stages.generate import run_generate

    dm = ArrayDataModule()
    dm.split_indices["train_few"] = [0, 1, 2, 3]  # every one holds a lesion
    cfg = load_config(None, ["augment.method=copy_paste", "generation.n_samples=2", "generation.source=normal"])
    with pytest.warns(UserWarning, match="generation.source=real"):
        run_generate(cfg, dm, tmp_path, {})


@pytest.mark.parametrize("over, metrics, says, never", [
    ([], {"gen/iou_pass_rate": 0.0, "gen/iou_threshold": 0.7}, "single_step gate rejected every sample: lower "
     "validator.iou_threshold (now 0.7)", "quality_quantile"),
    (["validator.iou_threshold=0", "validator.calibrate_real_pass=0.8"], {"gen/iou_pass_rate": 0.0, "gen/iou_threshold": 0.0},
     "validator.mode=none", "lower validator.iou_threshold"),
    (["validator.iou_threshold=0"], {"gen/iou_pass_rate": 1.0, "gen/quality_reject_rate": 1.0},
     "quality filter rejected every pair left", "iou_threshold"),
    (["validator.mode=none"], {"gen/iou_pass_rate": 1.0, "gen/quality_reject_rate": 0.5, "gen/near_copy_rate": 0.5},
     "(none was gated; 50% outliers, 50% near-copies", "iou_threshold"),
    (["validator.early_reject_t=400"], {"gen/n_early_rejected": 64.0}, "unset validator.early_reject_t", "quality"),
])
def test_no_accepted_pair_names_what_rejected_them(over, metrics, says, never):
    (line,), _ = run_verdicts(load_config(DIFFAUG, over), {**HEALTHY, "gen/n_accepted": 0.0, **metrics})
    assert says in line and never not in line, line


def test_a_step_bounded_training_bar_counts_steps_not_epochs(tmp_path):
    import lightning as L
    import torch

    from lightning_modules.progress import StepProgressBar

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    bar = StepProgressBar("fine-tune")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=1)
    trainer = L.Trainer(max_steps=3, max_epochs=-1, accumulate_grad_batches=2, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), loader)
    shown = bar.train_progress_bar
    assert (shown.desc.rstrip(": "), shown.n, shown.total) == ("fine-tune steps", 3, 3)  # 6 batches, 3 optimizer steps


def test_a_published_sd_tokenizer_loads_silently_with_the_same_tokens(tmp_path, capfd):
    from transformers import CLIPTokenizer

    from benchmarks.memory_shapes import write_sd_tokenizer
    from lightning_modules.tokenizer import legacy_special_tokens

    folder = write_sd_tokenizer(tmp_path / "tokenizer")
    plain = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert "Ignored unknown kwarg option __type" in capfd.readouterr().out  # the tokenizers library prints it
    quiet = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **legacy_special_tokens(folder))
    assert "__type" not in "".join(capfd.readouterr())
    text = ["a polyp, in the COLON!"]
    assert quiet(text).input_ids == plain(text).input_ids
    assert (quiet.bos_token, quiet.eos_token, quiet.unk_token, quiet.pad_token) == \
        (plain.bos_token, plain.eos_token, plain.unk_token, plain.pad_token)


def test_the_bf16_cast_prints_no_empty_fp32_notice(caplog):
    import torch
    from diffusers import AutoencoderKL

    from lightning_modules.diffusion_memory import _quiet_empty_fp32_notice

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    _quiet_empty_fp32_notice()
    with caplog.at_level("WARNING"):
        vae.to(torch.bfloat16)
    assert "should be kept in float32" not in caplog.text
