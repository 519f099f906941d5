"""CVC-ClinicDB: ``Original/<n>.tif`` + ``Ground Truth/<n>.tif`` (or the ``PNG/`` copies)."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Optional

from datamodules import register_dataset
from datamodules.pairs import Layout, pair_by_stem

# First frame of each of the 29 video sequences (frames 1..612); the last one ends at 612.
# Neighbouring frames of one sequence are near-duplicates: a random frame split leaks them.
SEQUENCE_STARTS = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318,
                   334, 353, 372, 390, 411, 434, 454, 478, 504, 527, 551, 569, 591)
LAST_FRAME = 612


def sequence_of(frame_id: str) -> str:
    """Video sequence group of a frame id (``"seq01"`` .. ``"seq29"``); other ids: their own."""
    try:
        n = int(frame_id)
    except ValueError:
        return f"frame-{frame_id}"
    if not 1 <= n <= LAST_FRAME:
        return f"frame-{frame_id}"
    return f"seq{bisect.bisect_right(SEQUENCE_STARTS, n):02d}"


@register_dataset("cvc_clinicdb")
class CvcClinicDB(Layout):
    """CVC-ClinicDB polyp frames (612 from 29 sequences), split by sequence, masks 0/255."""

    name = "cvc_clinicdb"
    classes = ("background", "polyp")
    prompt = "an endoscopic image of a colorectal polyp"
    modality = "polyp"
    expected = ("'Original/<n>.tif' + 'Ground Truth/<n>.tif', or 'PNG/Original' + "
                "'PNG/Ground Truth' (also 'TIF/...')")
    group_kind = "video sequence"

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        base = root
        for sub in ("", "TIF", "PNG"):
            if (root / sub / "Original").is_dir():
                base = root / sub
                break
        img_dir = self.require_dir(base, "Original")
        mask_dir = self.require_dir(base, "Ground Truth", "GroundTruth", "Ground_Truth")
        records = pair_by_stem(img_dir, mask_dir, problems)
        for r in records:
            r.group = sequence_of(r.id)
        return records
