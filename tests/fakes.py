"""The tests' shared fakes: fake pipeline stages and datamodules, tiny dataset writers, a fake diffusion.

Tests import this module (``import fakes``), never another test module. ``install()`` points
``experiments.runner.pipeline.STAGE_FUNCTIONS`` at the fake stages below and replaces the
datamodule builder, so the real pipeline (signatures, cache, MLflow runs) runs around stages that
take milliseconds. Every stage call appends one line to ``$FAKE_STAGE_CALLS/<stage>`` (or
``<cfg.output_dir>/fake_calls/<stage>``), so tests count invocations across processes.
``FAKE_SEGMENT_SLEEP`` (seconds) makes the segment stage slow enough to be killed mid-trial;
``FAKE_SEGMENT_FAIL_RATIO`` / ``FAKE_PRUNE_RATIO`` make it fail / prune at that ``augment.ratio``.

Below the stages: writers of tiny copies of each published dataset layout (20x24 px, so resizing
to 16 px is exercised; masks hold one rectangle), the gate fakes (a linear "VAE" diffusion, rendered
polyp pairs, oracle segmenters) and the datamodule stand-ins the generate, validate and segment
stages read.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datamodules.procedural import PROCEDURAL_KINDS, render_procedural

STAGES = ("finetune", "generate", "validate", "segment")


def _record(cfg: Any, stage: str, workdir: Path, event: str = "call") -> None:
    folder = Path(os.environ.get("FAKE_STAGE_CALLS") or Path(cfg.output_dir) / "fake_calls")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stage}.{event}", "a") as handle:  # one short O_APPEND write: atomic
        handle.write(f"{workdir.name}\n")


def fake_dice(cfg: Any) -> float:
    """A deterministic, smooth val/dice: best at θ = 0.7, ratio = 2, higher guidance a bit better."""
    theta, ratio = float(cfg.validator.iou_threshold), float(cfg.augment.ratio)
    value = 0.8 - (theta - 0.7) ** 2 - 0.01 * (ratio - 2.0) ** 2 + 0.001 * float(cfg.generation.guidance_scale)
    if cfg.augment.method in ("standard", "none"):
        value = 0.6
    return round(value + 0.001 * int(cfg.seed), 6)


def run_finetune(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "finetune", workdir)
    (workdir / "weights.txt").write_text("fake")
    return {"ft/loss": 0.1}


def run_generate(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "generate", workdir)
    (workdir / "manifest.jsonl").write_text(json.dumps({"id": "s0"}) + "\n")
    return {"gen/seconds": 0.01}


def run_validate(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "validate", workdir)
    (workdir / "accepted.jsonl").write_text("")
    return {"gen/accept_rate": 1.0 - float(cfg.validator.iou_threshold) / 2}


def run_segment(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    from sweeps.study import current_trial

    _record(cfg, "segment", workdir, "start")
    time.sleep(float(os.environ.get("FAKE_SEGMENT_SLEEP", "0")))
    ratio = float(cfg.augment.ratio)
    if os.environ.get("FAKE_SEGMENT_FAIL_RATIO") and ratio == float(os.environ["FAKE_SEGMENT_FAIL_RATIO"]):
        raise RuntimeError(f"fake segment failure at ratio {ratio}")
    if os.environ.get("FAKE_PRUNE_RATIO") and ratio == float(os.environ["FAKE_PRUNE_RATIO"]):
        import optuna  # what PyTorchLightningPruningCallback raises from inside trainer.fit

        raise optuna.TrialPruned("fake prune")
    _record(cfg, "segment", workdir)
    dice = fake_dice(cfg)
    return {"val/dice": dice, "test/dice": dice - 0.05, "fake/in_trial": float(current_trial() is not None)}


class FakeDataModule:
    """Stands in for a set-up datamodule; the fake stages never read it."""

    def __init__(self, cfg: Any):
        self.name = cfg.data.name
        self.ids = [f"fake{i}" for i in range(6)]
        self.split_indices = {"train": [0, 1, 2, 3], "train_few": [0, 1], "val": [4], "test": [5]}


def install(monkeypatch: Any = None) -> None:
    """Route the pipeline to the fake stages (through ``monkeypatch`` in tests, directly in scripts)."""
    from experiments import tracking
    from experiments.runner import pipeline

    module = sys.modules[__name__]
    table = {stage: getattr(module, f"run_{stage}") for stage in STAGES}
    replacements = [(pipeline, "STAGE_FUNCTIONS", table),
                    (pipeline, "build_datamodule", FakeDataModule),
                    # The real logger imports Lightning (seconds per process); fakes log nothing.
                    (tracking, "lightning_logger", lambda run, cfg: None)]
    for target, name, value in replacements:
        if monkeypatch is not None:
            monkeypatch.setattr(target, name, value)
        else:
            setattr(target, name, value)


def calls(folder: Path, stage: str, event: str = "call") -> int:
    """How many times ``stage`` was entered (``start``) or finished (``call``)."""
    path = Path(folder) / f"{stage}.{event}"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---------------------------------------------------------------- tiny dataset layouts
W, H = 20, 24


def _image(seed: int, w: int = W, h: int = H) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(seed: int, fg: int = 255, bg: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """uint8 (h,w) with a seeded rectangle of value ``fg`` on ``bg``."""
    rng = np.random.default_rng(seed + 1000)
    m = np.full((h, w), bg, np.uint8)
    y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
    m[y:y + 6, x:x + 6] = fg
    return m


def _save(arr_or_img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path)
    return path


def make_kvasir(root: Path, n: int = 10, official: bool = False) -> Path:
    ids = [f"cju{i}abc" for i in range(n)]
    for i, k in enumerate(ids):
        _save(_image(i), root / "images" / f"{k}.jpg")
        _save(Image.fromarray(_mask(i)).convert("RGB"), root / "masks" / f"{k}.jpg")  # lossy
    if official:
        (root / "train.txt").write_text("\n".join(ids[:7]) + "\n")
        (root / "val.txt").write_text("\n".join(ids[7:]) + "\n")
    return root


# Frames from 6 video sequences (1-25, 26-50, 51-67, 68-78, 79-103, 104-126).
CVC_FRAMES = (1, 2, 3, 26, 27, 28, 51, 52, 68, 69, 79, 80, 104, 105)


def make_cvc(root: Path, png: bool = False, frames=CVC_FRAMES) -> Path:
    base, ext = (root / "PNG", "png") if png else (root, "tif")
    for f in frames:
        _save(_image(f), base / "Original" / f"{f}.{ext}")
        _save(_mask(f), base / "Ground Truth" / f"{f}.{ext}")
    return root


def refuge_mask(seed: int) -> np.ndarray:
    """Raw REFUGE mask: 255 background, 128 disc rim, 0 cup inside the disc."""
    m = np.full((H, W), 255, np.uint8)
    m[4:16, 4:14] = 128
    m[7:12, 7:11] = 0
    return m


def make_refuge(root: Path, n: int = 4, with_val: bool = False, with_test: bool = False) -> Path:
    for cls, p in (("Glaucoma", "g"), ("Non-Glaucoma", "n")):
        for i in range(1, n + 1):
            _save(_image(i), root / "Training400" / cls / f"{p}{i:04d}.jpg")
            _save(refuge_mask(i), root / "Annotation-Training400" / "Disc_Cup_Masks" / cls /
                  f"{p}{i:04d}.bmp")
    for flag, img_dir, mask_dir, p in ((with_val, "REFUGE-Validation400",
                                        "REFUGE-Validation400-GT", "V"),
                                       (with_test, "REFUGE-Test400", "REFUGE-Test-GT", "T")):
        if flag:
            for i in range(1, 4):
                _save(_image(50 + i), root / img_dir / f"{p}{i:04d}.jpg")
                _save(refuge_mask(i), root / mask_dir / "Disc_Cup_Masks" / f"{p}{i:04d}.bmp")
    return root


def make_isic(root: Path, n: int = 8) -> Path:
    img_dir = root / "ISIC2018_Task1-2_Training_Input"
    gt_dir = root / "ISIC2018_Task1_Training_GroundTruth"
    for i in range(n):
        _save(_image(i), img_dir / f"ISIC_{i:07d}.jpg")
        _save(_mask(i), gt_dir / f"ISIC_{i:07d}_segmentation.png")
    for d in (img_dir, gt_dir):  # the published folders carry these; they must be ignored
        (d / "LICENSE.txt").write_text("CC-BY-NC")
        (d / "ATTRIBUTION.txt").write_text("ISIC")
    return root


def make_busi(root: Path, n: int = 4) -> Path:
    base = root / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for i in range(1, n + 1):
            _save(_image(i), base / cls / f"{cls} ({i}).png")
            if cls == "normal":
                _save(np.zeros((H, W), np.uint8), base / cls / f"{cls} ({i})_mask.png")
            else:
                _save(_mask(i), base / cls / f"{cls} ({i})_mask.png")
    # benign (1) has a second lesion in _mask_1.png: the masks are united
    second = np.zeros((H, W), np.uint8)
    second[18:22, 14:18] = 255
    _save(second, base / "benign" / "benign (1)_mask_1.png")
    return root


def make_folder(root: Path, n: int = 8, multiclass: bool = False) -> Path:
    for i in range(n):
        _save(_image(i), root / "images" / f"case{i}.png")
        m = _mask(i, fg=1)
        if multiclass:
            m[0:3, 0:3] = 2
        _save(m, root / "masks" / f"case{i}.png")
    return root


MAKERS = {"kvasir_seg": make_kvasir, "cvc_clinicdb": make_cvc, "refuge2": make_refuge,
          "isic2018": make_isic, "busi": make_busi, "folder": make_folder}


# ---------------------------------------------------------------- gate fakes
S = 64  # image size; the fake VAE downsamples 4x -> 16x16 latents


class FakeDiffusion(nn.Module):
    """The CONTRACTS diffusion API in a few lines: linear "VAE", shrinkage ε-predictor."""

    num_train_timesteps = 1000

    def __init__(self, seed: int = 0, factor: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        enc = torch.linalg.qr(torch.randn(4, 4, generator=g))[0][:, :3]  # orthonormal columns (4,3)
        self.factor = factor
        self.register_buffer("enc", enc)
        self.register_buffer("dec", torch.linalg.pinv(enc))
        betas = torch.linspace(1e-4, 0.02, self.num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))

    def encode_images(self, x):
        return torch.einsum("oc,bchw->bohw", self.enc, F.avg_pool2d(x * 2 - 1, self.factor))

    def decode_latents(self, z):
        x = torch.einsum("co,bohw->bchw", self.dec, z)
        return ((F.interpolate(x, scale_factor=self.factor, mode="nearest") + 1) / 2).clamp(0, 1)

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 2, 8)

    def predict_eps(self, z_t, t, mask_lat, masked_image_lat, text_emb):
        a = self.alphas_cumprod[torch.as_tensor(t).long()].view(-1, 1, 1, 1).to(z_t)
        outside = (z_t - a.sqrt() * masked_image_lat) / (1 - a).sqrt()  # known context: exact
        inside = (1 - a).sqrt() * z_t  # unknown content: the N(0, I)-prior guess
        return torch.where(mask_lat > 0.5, inside, outside)


def render(n: int, seed: int, lesion: bool = True, shift: int = 0, size: int = S):
    """Polyp-like pairs: smooth pink background, a red ellipse lesion.

    Returns images (n,3,S,S) in [0,1] and masks (n,S,S) int64 of the *original* lesion position (so
    ``shift``/``lesion=False`` give images whose lesion is misplaced/missing w.r.t. the mask).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.75, 0.45, 0.45]).view(1, 3, 1, 1)
    bg = base + 0.12 * F.interpolate(torch.rand(n, 3, 4, 4, generator=g) - 0.5, size=(size, size), mode="bilinear")
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.randint(size // 4, 3 * size // 4, (n, 2), generator=g)
    r = torch.randint(size // 8, size // 5, (n, 2), generator=g)
    masks = (((yy - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
             + ((xx - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1).long()
    drawn = torch.roll(masks, shifts=(shift, shift), dims=(1, 2)) if lesion else torch.zeros_like(masks)
    color = torch.tensor([0.95, 0.15, 0.2]).view(1, 3, 1, 1)
    images = torch.where(drawn[:, None].bool(), color + 0.05 * torch.randn(n, 3, size, size, generator=g), bg)
    return images.clamp(0, 1), masks


class OracleSegmenter:
    """Pixel segmenter that knows the lesion colour (for gate-logic tests)."""

    def predict_masks(self, images):
        return ((images[:, 0] - images[:, 1]) > 0.5).long()


class OracleLatentValidator:
    """Latent 'validator' that decodes the fake VAE and thresholds redness."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def predict_masks(self, x, t, out_size, prompt=None):
        img = self.diffusion.decode_latents(x)
        return F.interpolate(OracleSegmenter().predict_masks(img)[:, None].float(), size=tuple(out_size))[:, 0].long()


class OracleLogitValidator(OracleLatentValidator):
    """The oracle as an ensemble member: ``forward`` gives binary lesion logits (B,1,H,W) of its mask.

    ``scale`` sets the logits' magnitude, so members can disagree in confidence but not in the mask."""

    binary, prompted, device = True, False, torch.device("cpu")

    def __init__(self, diffusion, scale: float = 4.0):
        super().__init__(diffusion)
        self.scale = scale

    def __call__(self, x, t, out_size, prompt=None):
        mask = super().predict_masks(x, t, out_size).float()
        return (mask * 2 - 1)[:, None] * self.scale

    def to(self, device):
        return self


class CoreOnlySegmenter:
    """A weak gate: finds the lesion but only its core, so even real pairs reach IoU well below 0.7."""

    def predict_masks(self, images):
        lesion = OracleSegmenter().predict_masks(images).float()[:, None]
        return (1 - torch.nn.functional.max_pool2d(1 - lesion, 5, 1, 2))[:, 0].long()


# ---------------------------------------------------------------- stage datamodules
def to_u8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


class RenderedDataModule:
    """The attributes of a set-up SegmentationDataModule that the validate stage reads."""

    classes, num_classes, prompt, modality = ("background", "polyp"), 2, "a polyp", "polyp"

    def __init__(self):
        images, masks = render(24, seed=0)
        self.images, self.masks = to_u8(images), masks.numpy().astype(np.uint8)
        self.ids = [f"r{i}" for i in range(24)]
        self.split_indices = {"train": list(range(16)), "train_few": list(range(16)), "val": list(range(16, 24)), "test": []}

    def setup(self, stage=None):
        pass


_FOV_S = 32  # ArrayDataModule's image size


class ArrayDataModule:
    """What the generate stage reads: 32 px images in a round field of view.

    Rows 0-5 train_few (0-3 with a lesion), 6-7 val, 8-9 test; ``setup_calls`` counts ``setup()``.
    """

    prompt, background_prompt, modality = "a polyp", "normal mucosa", "polyp"
    classes = ("background", "polyp")

    def __init__(self):
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:_FOV_S, :_FOV_S]
        self.fov = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 15 ** 2
        self.images = np.zeros((10, _FOV_S, _FOV_S, 3), np.uint8)
        self.masks = np.zeros((10, _FOV_S, _FOV_S), np.uint8)
        for i in range(10):
            img = np.clip(rng.normal((150, 90, 80), 8, (_FOV_S, _FOV_S, 3)), 0, 255)
            img[~self.fov] = 0
            if i < 4 or i >= 6:
                cy, cx = rng.integers(9, 14, 2)
                lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
                img[lesion] = (210, 60, 60)
                self.masks[i][lesion] = 1
            self.images[i] = img.astype(np.uint8)
        self.ids = [f"real_{i}" for i in range(10)]
        self.split_indices = {"train": list(range(6)), "train_few": list(range(6)), "val": [6, 7], "test": [8, 9]}
        self.setup_calls = 0

    def setup(self, stage=None):
        self.setup_calls += 1


class _Pairs(Dataset):
    def __init__(self, images, masks, ids):
        self.images, self.masks, self.ids = images, masks, ids

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255,
                "mask": torch.from_numpy(self.masks[i]).long(), "id": self.ids[i]}


class TinyDataModule(L.LightningDataModule):
    """The parts of the SegmentationDataModule contract the segment stage uses, from procedural data."""

    def __init__(self, kind="polyp", n=24, size=32, batch_size=6):
        super().__init__()
        self.images, self.masks, meta = render_procedural(kind, n, size, seed=0)
        self.ids = [m["id"] for m in meta]
        self.classes = PROCEDURAL_KINDS[kind].classes
        self.num_classes = len(self.classes)
        k = n // 2
        self.split_indices = {"train_few": list(range(k)), "val": list(range(k, k + n // 4)),
                              "test": list(range(k + n // 4, n))}
        self.batch_size, self.extra_train = batch_size, None

    def setup(self, stage=None):
        pass

    def dataset(self, split, train_transforms=False):
        idx = self.split_indices[split]
        return _Pairs(self.images[idx], self.masks[idx], [self.ids[i] for i in idx])

    def train_dataloader(self):
        return DataLoader(self.dataset("train_few"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset("val"), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.dataset("test"), batch_size=self.batch_size)


def free_port() -> int:
    """A 127.0.0.1 TCP port free right now (bound, then released): for a server to start on, or, left
    unused, one nobody answers at."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_grid_file(tmp_path: Path, name: str, n_samples: int = 8, steps: int = 4) -> Path:
    """A one-cell grid on a test-width tiny base at 32 px, its store, artifacts and cache in ``tmp_path``:
    every stage runs for real in seconds (for tests that run ``meddiffaug grid`` in a subprocess)."""
    import yaml

    from lightning_modules.tiny_base import build_tiny_components, save_components

    base = tmp_path / "base"
    save_components(build_tiny_components(tmp_path / "tok", width="test", image_size=32), base)
    grid = {"name": name, "base_config": "experiments/configs/procedural_polyp_diffaug.yaml", "seeds": [0],
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"data.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                          f"diffusion.base_model={base}", "diffusion.steps=2", "diffusion.batch_size=2",
                          "data.image_size=32", "data.n_procedural=40", "data.n_real=4", "data.batch_size=4",
                          f"generation.n_samples={n_samples}", f"generation.steps={steps}", "generation.batch_size=4",
                          "validator.train_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=1"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path
