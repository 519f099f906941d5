"""Generation latents persisted for the latent-space gate (DiffAug: validation happens in latent space).

The generate stage already holds, per sample, the final clean latent ``z0`` (what it decodes) and its
inpainting condition (``mask_lat``, ``masked_lat``). It writes them once per batch to
``latents/<first id>.pt`` (before the manifest line that commits the batch) and each manifest row
names its shard in ``latents``; the validate stage then gates without touching the VAE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from datamodules.io import atomic_write

KEYS = ("z0", "mask_lat", "masked_lat")


def save_shard(root: Path, ids: Sequence[str], z0: torch.Tensor, mask_lat: torch.Tensor,
               masked_lat: torch.Tensor) -> str:
    """Write one batch's latents atomically; returns the path relative to ``root``.

    Args:
        ids: B sample ids (row k of each tensor belongs to ``ids[k]``).
        z0: (B,C,h,w) final clean latents. mask_lat: (B,1,h,w). masked_lat: (B,C,h,w).
    """
    rel = f"latents/{ids[0]}.pt"
    blob = {"ids": list(ids), **{k: v.detach().float().cpu().contiguous()
                                 for k, v in zip(KEYS, (z0, mask_lat, masked_lat))}}
    atomic_write(Path(root) / rel, lambda f: torch.save(blob, f))
    return rel


def load_latents(root: Path, rows: Sequence[dict]) -> Optional[dict]:
    """Stacked latents of ``rows`` in order, or None unless every row has a readable shard entry.

    Returns:
        ``{"z0": (N,C,h,w), "mask_lat": (N,1,h,w), "masked_lat": (N,C,h,w)}`` float32 CPU tensors.
    """
    if not rows or any(not r.get("latents") for r in rows):
        return None
    shards, out = {}, {k: [] for k in KEYS}
    for r in rows:
        path = Path(root) / r["latents"]
        if path not in shards:
            if not path.is_file():
                return None
            blob = torch.load(path, map_location="cpu", weights_only=True)
            shards[path] = (blob, {sid: k for k, sid in enumerate(blob["ids"])})
        blob, pos = shards[path]
        if r["id"] not in pos:
            return None
        for k in KEYS:
            out[k].append(blob[k][pos[r["id"]]])
    return {k: torch.stack(v) for k, v in out.items()}
