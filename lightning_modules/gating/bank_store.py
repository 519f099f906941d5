"""The latent validator's training items, kept on disk at latent resolution and read item by item.

A bank of ``M`` items holds, per item, two latents ``x``/``z0`` (C,h,w) float32, a timestep and two
indices into a table of masks (uint8, at image size: the resolution the validator's loss uses). The
masks are stored once per image, not once per item, and every array is a ``.npy`` file written batch by
batch and read through ``np.load(mmap_mode="r")``: building and training hold one batch in memory
whatever the number of real pairs and augmented copies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

LATENT_KEYS = ("x", "z0")


class BankWriter:
    """Preallocated ``.npy`` files under ``folder``, filled in order by :meth:`add_items` / :meth:`add_masks`.

    Args:
        folder: where the files go (made if missing; the caller removes it when done).
        n_items: M, the number of items.
        latent_shape: (C,h,w).
        n_masks: rows of the mask table.
        mask_shape: (H,W).
    """

    def __init__(self, folder: Path, n_items: int, latent_shape: tuple, n_masks: int, mask_shape: tuple):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        make = lambda name, dtype, shape: open_memmap(self.folder / f"{name}.npy", "w+", dtype, shape)  # noqa: E731
        self.arrays = {**{k: make(k, np.float32, (n_items, *latent_shape)) for k in LATENT_KEYS},
                       "t": make("t", np.int64, (n_items,)), "truth": make("truth", np.int64, (n_items,)),
                       "claim": make("claim", np.int64, (n_items,)),
                       "masks": make("masks", np.uint8, (n_masks, *mask_shape))}
        self.n_items, self.n_masks = 0, 0

    def add_masks(self, masks: torch.Tensor) -> int:
        """Append masks (B,H,W) (class indices < 256) to the table; returns the row of the first."""
        start = self.n_masks
        self.arrays["masks"][start:start + len(masks)] = masks.cpu().numpy().astype(np.uint8)
        self.n_masks += len(masks)
        return start

    def add_items(self, x: torch.Tensor, t: torch.Tensor, z0: torch.Tensor, truth, claim) -> None:
        """Append B items: latents (B,C,h,w), timesteps (B,), mask-table rows of the truth and the claimed mask (B,)."""
        s, b = self.n_items, len(x)
        for key, value in (("x", x), ("z0", z0), ("t", t), ("truth", truth), ("claim", claim)):
            self.arrays[key][s:s + b] = torch.as_tensor(value).detach().float().cpu().numpy() if key in LATENT_KEYS \
                else torch.as_tensor(value).cpu().numpy()
        self.n_items += b

    def close(self) -> "ValidatorBank":
        """Flush the files and open them for reading."""
        for array in self.arrays.values():
            array.flush()
        self.arrays = {}
        return ValidatorBank(self.folder)


class ValidatorBank(torch.utils.data.Dataset):
    """The items a :class:`BankWriter` wrote, as ``{"x", "t", "z0", "mask", "prompt"}`` per item.

    ``mask`` (H,W) is the truth and ``prompt`` (H,W) the mask the item claims, both uint8 class indices
    (the validator casts them); the latents are float32 (C,h,w).
    """

    def __init__(self, folder: Path):
        self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in Path(folder).glob("*.npy")}

    def __len__(self) -> int:
        return len(self.arrays["t"])

    def __getitem__(self, i: int) -> dict:
        a = self.arrays
        return {"x": torch.from_numpy(np.array(a["x"][i])), "t": torch.tensor(int(a["t"][i])),
                "z0": torch.from_numpy(np.array(a["z0"][i])),
                "mask": torch.from_numpy(np.array(a["masks"][a["truth"][i]])),
                "prompt": torch.from_numpy(np.array(a["masks"][a["claim"][i]]))}

    def materialise(self) -> dict:
        """Every item at once, as the dict of (M,...) tensors the older in-memory bank was (tests, small banks)."""
        a = self.arrays
        return {"x": torch.from_numpy(np.array(a["x"])), "t": torch.from_numpy(np.array(a["t"])),
                "z0": torch.from_numpy(np.array(a["z0"])),
                "mask": torch.from_numpy(np.array(a["masks"][np.array(a["truth"])])).long(),
                "prompt": torch.from_numpy(np.array(a["masks"][np.array(a["claim"])])).long()}
