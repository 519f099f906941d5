"""The batching loops of the gates: a gate over N samples in chunks, and a model call over a few rows at a time."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from lightning_modules.progress import progress

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]

# Rows per call of the diffusion model's parts inside a gate batch. The SD VAE's encoder holds about
# 0.6 GiB of activations per 512 px image (fp32), so 16 at once would need ~10 GiB; the UNet's ε̂ at
# 64x64 latents about 0.15 GiB per sample. Results are the same up to float rounding.
ENCODE_BATCH = 4
EPS_BATCH = 16


def gate_in_batches(gate: Callable, inputs: Inputs, masks: torch.Tensor, batch_size: int = 16,
                    sink: Optional[Callable[[int, torch.Tensor], None]] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``gate(inputs[i:j], masks[i:j]) -> (iou (B,), pred (B,H,W))`` over all N samples.

    Args:
        gate: an image-space gate (``inputs`` = images (N,3,H,W)) or a latent gate (``inputs`` = a
            dict of (N,...) latent tensors, sliced key by key). ``inputs`` and ``masks`` may be any
            row-sliceable views (:class:`datamodules.rows.LazyRows`): only one batch is read at a time.
        masks: (N,H,W) int64 claimed masks.
        sink: ``sink(first row, pred (B,H,W))`` takes each batch's predictions instead of keeping them,
            so memory does not grow with N.

    Returns:
        ``(iou (N,), pred (N,H,W))``, pred None with a ``sink``; empty tensors for N = 0.
    """
    ious, preds = [], []
    starts = range(0, len(masks), batch_size)
    for i in progress(starts, "gate scoring", total=len(starts), unit="batch"):
        part = {k: v[i:i + batch_size] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i:i + batch_size]
        iou, pred = gate(part, masks[i:i + batch_size])
        ious.append(iou)
        if sink is None:
            preds.append(pred)
        else:
            sink(i, pred)
    if not ious:
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long) if sink is None else None
    return torch.cat(ious), torch.cat(preds) if sink is None else None


def in_chunks(fn: Callable, *tensors: torch.Tensor, size: int = ENCODE_BATCH):
    """``fn`` over ``size`` rows of every tensor at a time; its outputs (a tensor or a tuple) concatenated."""
    parts = [fn(*(x[i:i + size] for x in tensors)) for i in range(0, len(tensors[0]), size)]
    if torch.is_tensor(parts[0]):
        return torch.cat(parts)
    return tuple(torch.cat(p) for p in zip(*parts))
