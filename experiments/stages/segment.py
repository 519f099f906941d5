"""Segment stage: train the smp segmenter on real (+ accepted synthetic) pairs, test the best checkpoint."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from datamodules.augmented import training_set
from datamodules.io import atomic_write
from experiments.runner.builders import build_segmenter
from experiments.runner.external_tests import external_sets, signature_inputs
from experiments.cache.signatures import subtree
from experiments.runner.trainer import build_trainer
from lightning_modules.segmenter import SegmenterModule

# Bump when this stage's code changes what it produces for the same config (see experiments.runner.pipeline).
# 1: albumentations augmentations are seeded from augment.seed (before, each run drew them from OS
#    entropy, so a rerun of a cell was not the same run); the validate stage's version 1 covers the
#    validator's seeded augment copies.
VERSION = 1


def inputs(cfg: DictConfig) -> Dict[str, Any]:
    """The config values this stage's result depends on (its part of the signature)."""
    return {"data": subtree(cfg, "data"), "augment": subtree(cfg, "augment"), "segmenter": subtree(cfg, "segmenter"),
            "trainer": subtree(cfg, "trainer"), "seed": cfg.seed, **signature_inputs(cfg)}


def _metrics(trainer: L.Trainer, prefixes: tuple[str, ...]) -> Dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}


def fit_segmenter(cfg: DictConfig, datamodule: Any, workdir: str | Path, logger: Any = None,
                  train_set: Optional[Dataset] = None, callbacks: Iterable[Any] = (),
                  external: Iterable[Any] = (), **trainer_overrides: Any) -> Dict[str, float]:
    """Train, select the best epoch on ``val/dice``, and test it.

    Checkpoints go to ``workdir/checkpoints`` (``best-<epoch>.ckpt`` and ``last.ckpt``); an existing
    ``last.ckpt`` is resumed, so a killed run, or a rerun with a larger ``trainer.max_epochs``,
    continues where it stopped. A prediction grid of the test split is written to
    ``workdir/predictions.png``.

    Args:
        cfg: resolved config (seed, data.small_lesion_area, segmenter, trainer).
        datamodule: a ``SegmentationDataModule`` (its ``val`` and ``test`` splits; it is not modified).
        workdir: stage folder.
        logger: Lightning logger or None.
        train_set: the training Dataset of ``{"image", "mask", "id"}`` samples (see
            :func:`datamodules.augmented.training_set`); default the datamodule's own train loader.
        callbacks: extra callbacks.
        external: external test sets (:func:`experiments.runner.external_tests.external_sets`), tested after
            the in-domain test with the same checkpoint.
        **trainer_overrides: extra ``L.Trainer`` keywords (tests).

    Returns:
        Floats: ``val/dice``, ``val/iou``, ``val/loss`` of the best checkpoint, every ``test/*``
        metric (``test/<set>/*`` of each external set), ``seg/best_epoch`` and ``seg/collapsed`` (1.0 when best val/dice is under
        ``cfg.segmenter.collapse_dice`` or NaN).
    """
    L.seed_everything(cfg.seed, workers=True)
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    datamodule.setup()
    train = datamodule.train_dataloader() if train_set is None else DataLoader(
        train_set, batch_size=datamodule.batch_size, shuffle=True, num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0)
    module = build_segmenter(cfg, datamodule, total_steps=cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else None)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor="val/dice", mode="max",
                                 save_last=True, save_top_k=1, auto_insert_metric_name=False)
    trainer = build_trainer(cfg, workdir, logger=logger, callbacks=[checkpoint, *callbacks], train_batches=len(train),
                            **trainer_overrides)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, train_dataloaders=train, val_dataloaders=datamodule.val_dataloader(),
                ckpt_path=str(last) if last.is_file() else None)
    for callback in callbacks:  # Optuna's pruning signal does not cross spawned DDP processes
        getattr(callback, "check_pruned", lambda: None)()

    best = checkpoint.best_model_path
    trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = _metrics(trainer, ("val/",))
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics.update(_metrics(trainer, ("test/",)))
    metrics.update(evaluate_external(trainer, module, list(external), best or None, datamodule.batch_size, workdir))
    match = re.search(r"best-(\d+)", Path(best).name) if best else None
    metrics["seg/best_epoch"] = float(match.group(1)) if match else float("nan")
    dice = metrics.get("val/dice", float("nan"))
    metrics["seg/collapsed"] = float(math.isnan(dice) or dice < cfg.segmenter.collapse_dice)
    if trainer.is_global_zero:
        if best:  # under ddp_spawn, test ran in child processes: load the best weights here too
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        save_prediction_figure(module, datamodule.dataset("test"), workdir / "predictions.png")
    return metrics


def run_segment(cfg: DictConfig, datamodule: Any, workdir: str | Path, upstream: Mapping[str, Path],
                logger: Any = None, callbacks: Iterable[Any] = ()) -> Dict[str, float]:
    """Pipeline entry point: train on this run's own training set, select on val, test.

    The training set is built here from the real ``train_few`` split and, with ``augment.method``
    ``diffusion`` or ``copy_paste``, the validate stage's accepted pairs at ``augment.ratio``
    (:func:`datamodules.augmented.training_set`); the shared datamodule is only read, so sweeps can
    reuse it across cells and trials. ``callbacks`` come from the caller (e.g. Optuna pruning). With
    ``augment.synthetic_only`` the segmenter trains on those synthetic pairs alone (validation stays real).
    """
    synthetic = cfg.augment.method in ("diffusion", "copy_paste") and cfg.augment.ratio > 0 and "validate" in upstream
    # "none" is the real-only row without standard augmentation
    train_set = training_set(datamodule, "none" if cfg.augment.method == "none" else cfg.data.transforms,
                             Path(upstream["validate"]) if synthetic else None, ratio=cfg.augment.ratio,
                             seed=cfg.augment.seed, synthetic_transforms=cfg.data.transforms,
                             include_real=not cfg.augment.get("synthetic_only", False))
    return fit_segmenter(cfg, datamodule, workdir, logger=logger, train_set=train_set, callbacks=callbacks,
                         external=external_sets(cfg, datamodule))


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB image (H,W,3) in [0,1] with class indices (H,W) tinted (1 green, 2 blue, 3 red, ...)."""
    colours = np.array([[0, 0, 0], [0, 1, 0], [0, 0.4, 1], [1, 0, 0], [1, 1, 0]], dtype=np.float32)
    tint = colours[np.clip(mask, 0, len(colours) - 1)]
    alpha = 0.45 * (mask > 0)[..., None]
    return image * (1 - alpha) + tint * alpha


def save_prediction_figure(module: SegmenterModule, dataset: Any, path: str | Path, n: int = 8) -> Path:
    """Write a PNG grid, one row per sample: image | truth overlay | prediction overlay.

    Samples are spread evenly over ``dataset`` (items ``{"image": (3,H,W) float, "mask": (H,W)}``).
    The file is written atomically, so readers never see a partial PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n = min(n, len(dataset))
    idx = np.linspace(0, len(dataset) - 1, n).round().astype(int) if n else []
    items = [dataset[int(i)] for i in idx]
    fig = Figure(figsize=(6, 2 * max(n, 1)))
    FigureCanvasAgg(fig)
    if items:
        images = torch.stack([it["image"] for it in items])
        preds = module.predict_masks(images).cpu().numpy()
        axes = fig.subplots(n, 3, squeeze=False)
        for r, it in enumerate(items):
            img = it["image"].permute(1, 2, 0).numpy()
            truth = np.asarray(it["mask"])
            for c, (panel, title) in enumerate([(img, "image"), (_overlay(img, truth), "truth"),
                                                (_overlay(img, preds[r]), "prediction")]):
                axes[r, c].imshow(np.clip(panel, 0, 1))
                axes[r, c].set_axis_off()
                axes[r, c].set_title(f"{title} {it.get('id', '')}" if c == 0 else title, fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), fsync=False)


def evaluate_external(trainer: Any, module: Any, sets: list, ckpt_path: Optional[str], batch_size: int,
                      workdir: Path) -> Dict[str, float]:
    """Test the selected checkpoint on each external set: ``test/<label>/<metric>`` floats.

    The metrics are the in-domain test's (the segmenter's torchmetrics, under another prefix); a
    prediction grid of each set is written to ``workdir/predictions_<label>.png``.
    """
    metrics: Dict[str, float] = {}
    for ext in sets:
        prefix = f"test/{ext.label}"
        module.test_prefix = prefix
        try:
            loader = DataLoader(ext.dataset(), batch_size=batch_size, shuffle=False)
            trainer.test(module, dataloaders=loader, ckpt_path=ckpt_path, verbose=False)
        finally:
            module.test_prefix = "test"
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix + "/")})
        if trainer.is_global_zero:
            save_prediction_figure(module, ext.dataset(), Path(workdir) / f"predictions_{ext.label}.png")
    return metrics
