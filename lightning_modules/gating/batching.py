"""The one batching loop of the gates: apply a gate to N samples in chunks, concatenate the results."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]


def gate_in_batches(gate: Callable, inputs: Inputs, masks: torch.Tensor,
                    batch_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """``gate(inputs[i:j], masks[i:j]) -> (iou (B,), pred (B,H,W))`` over all N samples.

    Args:
        gate: an image-space gate (``inputs`` = images (N,3,H,W)) or a latent gate (``inputs`` = a
            dict of (N,...) latent tensors, sliced key by key).
        masks: (N,H,W) int64 claimed masks.

    Returns:
        ``(iou (N,), pred (N,H,W))``; empty tensors for N = 0.
    """
    ious, preds = [], []
    for i in range(0, len(masks), batch_size):
        part = {k: v[i:i + batch_size] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i:i + batch_size]
        iou, pred = gate(part, masks[i:i + batch_size])
        ious.append(iou), preds.append(pred)
    if not ious:
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long)
    return torch.cat(ious), torch.cat(preds)
