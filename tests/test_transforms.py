"""Training augmentations are reproducible from the run's seed, and each DataLoader worker differs."""
import numpy as np
import torch

from datamodules.base import SegmentationDataset
from datamodules.transforms import build_transforms


def _dataset(seed):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    masks = (rng.random((8, 16, 16)) > 0.7).astype(np.uint8)
    return SegmentationDataset(images, masks, [f"i{k}" for k in range(8)], range(8),
                               build_transforms("standard", seed=seed))


def _epoch(dataset, workers=0):
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, shuffle=False)
    return torch.cat([batch["image"] for batch in loader])


def test_same_seed_same_augmentations_other_seed_others():
    assert torch.equal(_epoch(_dataset(3)), _epoch(_dataset(3)))
    assert not torch.equal(_epoch(_dataset(3)), _epoch(_dataset(4)))


def test_workers_draw_their_own_reproducible_streams():
    first, second = _epoch(_dataset(3), workers=2), _epoch(_dataset(3), workers=2)
    assert torch.equal(first, second)
    # Worker 0 serves items 0, 2, 4, 6 and worker 1 items 1, 3, 5, 7: with one shared stream the
    # two workers would apply the same draw sequence; with their own streams they differ.
    single = _epoch(_dataset(3), workers=0)
    assert not torch.equal(first, single)
