"""Segmenter module, its metrics, and the segment stage (fit / resume / figure)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from experiments.config import load_config
from experiments.stages.segment import fit_segmenter, save_prediction_figure
from lightning_modules.seg_metrics import LesionFNR, dice_metric, iou_metric
from lightning_modules.segmenter import SegmenterModule

from fakes import TinyDataModule


def _squares(size=32):
    """Truth with one small (3x3 = 0.9 %) and one large (10x10 = 9.8 %) lesion, (1,H,W) int64."""
    t = torch.zeros(1, size, size, dtype=torch.long)
    t[0, 2:5, 2:5] = 1
    t[0, 15:25, 15:25] = 1
    return t


def test_metrics_on_perfect_and_empty_predictions():
    target = _squares()
    dice, iou, fnr = dice_metric(2), iou_metric(2), LesionFNR(2, small_lesion_area=0.02)
    for m in (dice, iou, fnr):
        m.update(target, target)
    assert dice.compute().item() == pytest.approx(1.0)
    assert iou.compute().item() == pytest.approx(1.0)
    out = fnr.compute()
    assert out["fnr"].item() == 0 and out["fnr_small"].item() == 0 and out["n_small"].item() == 1
    empty = LesionFNR(2, small_lesion_area=0.02)
    empty.update(torch.zeros_like(target), target)
    assert empty.compute()["fnr"].item() == 1.0 and empty.compute()["fnr_small"].item() == 1.0


def test_small_lesion_fnr_counts_lesions_not_pixels():
    target = _squares()
    pred = target.clone()
    pred[0, 2:5, 2:5] = 0
    pred[0, 2, 2:5] = 1  # 3 of 9 pixels of the small lesion: missed (< half)
    metric = LesionFNR(2, small_lesion_area=0.02)
    metric.update(pred, target)
    second = target.clone()
    pred2 = target.clone()
    pred2[0, 4, 2:5] = 0  # 6 of 9 pixels: found
    metric.update(pred2, second)
    out = metric.compute()
    assert out["n_small"].item() == 2 and out["fnr_small"].item() == pytest.approx(0.5)
    assert out["fnr"].item() == pytest.approx((6 + 3) / (2 * 109))  # pixel FNR pools all positives


def test_multiclass_metrics_per_class():
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[0, 8:24, 8:24], target[0, 12:20, 12:20] = 1, 2
    pred = target.clone()
    pred[pred == 2] = 1  # cup entirely missed
    dice, fnr = dice_metric(3), LesionFNR(3, small_lesion_area=0.1)
    dice.update(pred, target)
    fnr.update(pred, target)
    per_class = dice.compute()
    assert per_class.shape == (2,) and per_class[1].item() == 0.0 and 0.5 < per_class[0].item() < 1
    assert fnr.compute()["fnr_per_class"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("kind", ["polyp", "fundus"])
def test_overfits_one_batch(kind):
    torch.manual_seed(0)
    dm = TinyDataModule(kind, n=8)
    batch = next(iter(DataLoader(dm.dataset("train_few"), batch_size=2)))
    module = SegmenterModule(num_classes=dm.num_classes, lr=3e-3, total_steps=15, class_names=dm.classes)
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(15):
        loss = module.loss(module(batch["image"]), batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    pred = module.predict_masks(batch["image"])
    assert pred.shape == batch["mask"].shape and pred.dtype == torch.int64 and module.training


def test_odd_input_size_and_local_encoder_weights(tmp_path):
    src = SegmenterModule(num_classes=2)
    torch.save(src.model.encoder.state_dict(), tmp_path / "enc.pth")
    module = SegmenterModule(num_classes=2, encoder_weights=str(tmp_path / "enc.pth"))
    key = next(iter(src.model.encoder.state_dict()))
    assert torch.equal(module.model.encoder.state_dict()[key], src.model.encoder.state_dict()[key])
    assert module.predict_masks(torch.rand(2, 3, 40, 36)).shape == (2, 40, 36)
    with pytest.raises(ValueError, match="never download"):
        SegmenterModule(num_classes=2, encoder_weights="imagenet")


class _EpochRecorder(L.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append(trainer.current_epoch)


@pytest.mark.slow
def test_fit_segmenter_returns_metrics_and_resumes(tmp_path):
    cfg = load_config(overrides=["trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    dm = TinyDataModule("polyp")
    first = fit_segmenter(cfg, dm, tmp_path, enable_progress_bar=False)
    for key in ("val/dice", "val/iou", "test/dice", "test/iou", "test/fnr", "test/fnr_small", "test/n_small",
                "seg/collapsed", "seg/best_epoch"):
        assert key in first and isinstance(first[key], float)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "predictions.png").is_file()
    recorder = _EpochRecorder()
    cfg2 = load_config(overrides=["trainer.max_epochs=2", "trainer.log_every_n_steps=1"])
    second = fit_segmenter(cfg2, dm, tmp_path, callbacks=[recorder], enable_progress_bar=False)
    assert recorder.epochs == [1]  # continued from last.ckpt instead of starting over
    assert second["seg/best_epoch"] in (0.0, 1.0)


@pytest.mark.slow
def test_fit_segmenter_multiclass(tmp_path):
    cfg = load_config(overrides=["trainer.max_epochs=1"])
    out = fit_segmenter(cfg, TinyDataModule("fundus"), tmp_path, enable_progress_bar=False)
    assert {"test/dice_optic_disc", "test/dice_optic_cup", "test/fnr_small"} <= set(out)


def test_prediction_figure_is_written(tmp_path):
    dm = TinyDataModule("fundus", n=8)
    path = save_prediction_figure(SegmenterModule(num_classes=3), dm.dataset("test"), tmp_path / "f.png", n=2)
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name != "f.png"]  # no temp file left behind
