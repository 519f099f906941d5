"""The latent gate's training data holds one batch in memory, whatever the number of real pairs (issue #26)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fakes import FakeDiffusion, render
from lightning_modules.gating.validator_bank import AugmentedPairs, build_validator_bank

REPO = Path(__file__).resolve().parent.parent
SIZE, COPIES, PER_IMAGE = 128, 4, 3

# Builds the bank of n pairs and reads it once as training does, in a fresh process; prints the peak of its
# anonymous memory (RssAnon, sampled every millisecond) above where it started. Anonymous: the bank's
# files are mapped, and their pages belong to the page cache, which the system reclaims.
PROBE = f"""
import sys, tempfile, threading, time
sys.path.insert(0, "tests")
import torch
from fakes import FakeDiffusion, render
from lightning_modules.gating.validator_bank import AugmentedPairs, build_validator_bank

def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:"))

images, masks = render(int(sys.argv[1]), seed=0, size={SIZE})
diffusion, peak, stop = FakeDiffusion(), [0], threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.001)
base, watcher = anon(), threading.Thread(target=watch)
watcher.start()
with tempfile.TemporaryDirectory() as folder:
    bank = build_validator_bank(diffusion, AugmentedPairs(images, masks, {COPIES}), "a polyp", [200], folder,
                                per_image={PER_IMAGE})
    for batch in torch.utils.data.DataLoader(bank, batch_size=16, shuffle=True):
        pass
stop.set(), watcher.join()
print((peak[0] - base) / 1024)
"""


def _peak_mib(*n_pairs: int) -> list:
    """The probe's peak for each number of pairs, the processes run side by side."""
    runs = [subprocess.Popen([sys.executable, "-c", PROBE, str(n)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            for n in n_pairs]
    peaks = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        peaks.append(float(out.strip().splitlines()[-1]))
    return peaks


def test_gate_training_data_memory_is_flat_when_the_pairs_double():
    small, large = _peak_mib(16, 32)
    # what the 16 extra pairs' items alone would take held in memory: two int64 masks per item at image size
    extra_items = 16 * COPIES * (3 + PER_IMAGE)
    held = extra_items * 2 * SIZE * SIZE * 8 / 2**20  # 96 MiB
    assert large - small < held / 3, (small, large, held)


def test_the_bank_keeps_masks_once_per_pair_as_uint8(tmp_path):
    images, masks = render(5, seed=0, size=32)
    bank = build_validator_bank(FakeDiffusion(), AugmentedPairs(images, masks, 2), "a polyp", [200], tmp_path,
                                per_image=3)
    assert len(bank) == 10 * (3 + 3) and bank.arrays["masks"].dtype == np.uint8
    assert len(bank.arrays["masks"]) == 2 * 10  # each pair's mask and its erased truth: not one per item
    item = bank[0]
    assert item["mask"].shape == (32, 32) and item["x"].shape == (4, 8, 8)
    assert torch.equal(item["mask"].long(), masks[0])  # the first items: the real pairs, their own masks
