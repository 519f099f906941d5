"""The downstream segmenter: any segmentation_models_pytorch architecture as a LightningModule.

It is the judge of every augmentation method, so it is deliberately standard: Dice + BCE/CE,
AdamW with per-step cosine decay, per-image Dice/IoU per class, and the lesion-level FNR for
small lesions that augmentation papers claim to improve.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from lightning_modules.seg_metrics import LesionFNR, dice_metric, iou_metric

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def load_encoder_weights(model: torch.nn.Module, path: str) -> None:
    """Load a local encoder weights file (never a download) into ``model.encoder``.

    Accepts a torchvision/timm-style state dict (``fc.*`` / head keys ignored), an smp model
    state dict (``encoder.`` prefix stripped) or a safetensors file.

    Raises:
        ValueError: the path is not a file (e.g. ``"imagenet"``) or no key matches the encoder.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"segmenter.encoder_weights='{path}' is not a local file. Models never download: "
                         "use null, or the path of a weights file you downloaded yourself.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    own = model.encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"{path}: no tensor matches the encoder's parameters; is it for this encoder?")
    model.encoder.load_state_dict(matched, strict=False)


_UNET_STYLE = {"unet", "unetplusplus", "manet"}


class SegmenterModule(L.LightningModule):
    """smp segmenter with Dice+BCE (binary) or Dice+CE (multi-class) loss.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ...).
        encoder: smp encoder name (``resnet18``, ``efficientnet-b0``, ...).
        encoder_weights: None (random init) or a local weights file.
        num_classes: classes including background; 2 means binary (one logit channel).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        min_lr_ratio: cosine decay ends at ``lr * min_lr_ratio``.
        small_lesion_area: lesions under this image fraction count for ``fnr_small``.
        total_steps: length of the cosine schedule in optimizer steps; None = the trainer's
            estimated total.
        class_names: names for per-class metrics (index 0 = background); default ``"1"``, ``"2"``...
        encoder_depth: encoder stages (5 = smp default; 4 is about twice as fast at 64 px).
            Applied to Unet-style archs only (Unet, UnetPlusPlus, MAnet); others keep smp's default.
        decoder_channels: decoder widths, one per stage (Unet-style archs); None = smp default.
    """

    def __init__(self, arch: str = "Unet", encoder: str = "resnet18", encoder_weights: Optional[str] = None,
                 num_classes: int = 2, lr: float = 1e-3, weight_decay: float = 1e-4, min_lr_ratio: float = 0.05,
                 small_lesion_area: float = 0.02, total_steps: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, encoder_depth: int = 5,
                 decoder_channels: Optional[Sequence[int]] = None):
        super().__init__()
        self.save_hyperparameters()
        self.binary = num_classes <= 2
        self.num_classes = max(num_classes, 2)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        shape = {}
        if arch.lower() in _UNET_STYLE:  # other archs (FPN, DeepLabV3+) assume their own depth/widths
            shape = {"encoder_depth": encoder_depth} if encoder_depth != 5 else {}
            if decoder_channels:
                shape["decoder_channels"] = list(decoder_channels)
        self.model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=3,
                                      classes=1 if self.binary else self.num_classes, **shape)
        for stage in range(shape.get("encoder_depth", 5), 5):  # ResNet stages a shallower encoder never runs: drop them,
            if hasattr(self.model.encoder, f"layer{stage}"):  # or DDP stops on unused parameters
                delattr(self.model.encoder, f"layer{stage}")
        if encoder_weights:
            load_encoder_weights(self.model, encoder_weights)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        mode = "binary" if self.binary else "multiclass"
        self.dice_loss = smp.losses.DiceLoss(mode=mode, from_logits=True)
        self.val_dice, self.val_iou = dice_metric(self.num_classes), iou_metric(self.num_classes)
        self.test_dice, self.test_iou = dice_metric(self.num_classes), iou_metric(self.num_classes)
        self.test_fnr = LesionFNR(self.num_classes, small_lesion_area)
        self.test_prefix = "test"  # "test/<set>" while an external test set is tested

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B,K,H,W) (K = 1 binary, else num_classes) of images (B,3,H,W) in [0,1]."""
        x = (images - self.mean) / self.std
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 32, (-w) % 32  # smp encoders downsample 5 times
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return self.model(x)[..., :h, :w]

    def logits_to_masks(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices (B,H,W) int64 from logits (B,K,H,W)."""
        if self.binary:
            return (logits[:, 0] > 0).long()
        return logits.argmax(1)

    @torch.no_grad()
    def predict_masks(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices (B,H,W) int64 for images (B,3,H,W) in [0,1]; keeps train/eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.logits_to_masks(self(images.to(self.device, self.dtype)))
        finally:
            self.train(was_training)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Dice + BCE (binary) or Dice + CE (multi-class); ``masks`` (B,H,W) int64."""
        if self.binary:
            target = (masks > 0).float().unsqueeze(1)
            return self.dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        return self.dice_loss(logits, masks) + F.cross_entropy(logits, masks)

    def training_step(self, batch, batch_idx):
        loss = self.loss(self(batch["image"]), batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch, metrics) -> None:
        logits = self(batch["image"])
        masks = batch["mask"]
        if self.binary:
            masks = (masks > 0).long()
        pred = self.logits_to_masks(logits)
        for m in metrics:
            m.update(pred, masks)
        return logits, masks

    def validation_step(self, batch, batch_idx):
        logits, masks = self._eval_step(batch, (self.val_dice, self.val_iou))
        self.log("val/loss", self.loss(logits, masks), batch_size=len(masks), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, (self.test_dice, self.test_iou, self.test_fnr))

    @staticmethod
    def _iou_values(iou: torch.Tensor) -> torch.Tensor:
        return torch.where(iou < 0, torch.full_like(iou, float("nan")), iou)  # -1 = class never present

    def on_validation_epoch_end(self) -> None:
        # compute() of torchmetrics syncs across DDP ranks, so the logged values are global
        dice, iou = self.val_dice.compute(), self._iou_values(self.val_iou.compute())
        self.log("val/dice", dice.float().nanmean(), prog_bar=True)
        self.log("val/iou", iou.float().nanmean())
        self.val_dice.reset()
        self.val_iou.reset()

    def on_test_epoch_end(self) -> None:
        dice, iou = self.test_dice.compute().float(), self._iou_values(self.test_iou.compute()).float()
        fnr = self.test_fnr.compute()
        p = self.test_prefix
        values = {f"{p}/dice": dice.nanmean(), f"{p}/iou": iou.nanmean(), f"{p}/fnr": fnr["fnr"],
                  f"{p}/fnr_small": fnr["fnr_small"], f"{p}/n_small": fnr["n_small"]}
        if not self.binary:
            for c, name in enumerate(self.class_names[1:]):
                values[f"{p}/dice_{name}"] = dice[c]
                values[f"{p}/iou_{name}"] = iou[c]
                values[f"{p}/fnr_small_{name}"] = fnr["fnr_small_per_class"][c]
        for key, value in values.items():
            self.log(key, value.float())
        for m in (self.test_dice, self.test_iou, self.test_fnr):
            m.reset()

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = hp.total_steps or self.trainer.estimated_stepping_batches
        total = max(int(total), 1) if math.isfinite(total) else 1000

        def factor(step: int) -> float:  # cosine from 1 to min_lr_ratio, then flat
            progress = min(step, total) / total
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
