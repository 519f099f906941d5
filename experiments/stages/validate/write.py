"""Write: ``decisions.jsonl`` (every sample and why), ``accepted.jsonl`` + eroded masks, ``accept_reject.png``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import torch

from datamodules.io import atomic_write, atomic_write_text, read_mask, write_png
from datamodules.rows import LazyRows
from experiments.stages.validate.erode import erode_new_lesion


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON object per line (sorted keys), atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_decisions(workdir: Path, gen_dir: Path, gen, decision: dict, erode_px: int, description: str) -> List[dict]:
    """Write the stage's manifests and the eroded masks of the accepted samples.

    Erosion shrinks only the newly generated lesion (the row's ``new_mask``); the source's own
    lesions keep their rims (:func:`experiments.stages.validate.erode.erode_new_lesion`). Each
    accepted row records it: ``eroded = {"px", "applied_to": "new_lesion" | "whole_label" | "none"}``.

    Args:
        gen: the generated samples (``rows``, ``raw_mask(k)``, ``early``).
        decision: tensors over the n samples: ``ious``, ``score``, ``iou_ok``, ``outlier``, ``near``,
            ``accepted``, and ``theta`` (float).
        description: the gate that judged them (recorded per sample).

    Returns:
        The accepted rows (image paths absolute, masks relative to ``workdir``).
    """
    d, acc_rows, decisions = decision, [], []
    for i, row in enumerate(gen.rows):
        reasons = ([] if d["iou_ok"][i] else [f"iou<{d['theta']:.4g}"]) + (["outlier"] if d["outlier"][i] else []) \
            + (["near_copy"] if d["near"][i] else [])
        iou = None if torch.isnan(d["ious"][i]) else round(float(d["ious"][i]), 4)
        q = None if torch.isnan(d["score"][i]) else round(float(d["score"][i]), 4)
        decisions.append({"id": row["id"], "accepted": bool(d["accepted"][i]), "iou": iou, "quality_score": q,
                          "reasons": reasons, "gate": description,
                          "pred_mask": pred_path(row["id"]) if d.get("preds_written") else None})
        if d["accepted"][i]:
            mask_path = workdir / "masks" / f"{row['id']}.png"
            new_path = (gen_dir / row["new_mask"]).resolve() if row.get("new_mask") else None
            new = read_mask(new_path) if new_path is not None and int(erode_px) > 0 else None
            write_png(mask_path, erode_new_lesion(gen.raw_mask(i), new, int(erode_px)))
            # the image stays in the generate folder; workdir is renamed when done, so masks are relative;
            # new_mask (the generated lesion, not eroded) is absolute like the image
            acc_rows.append({**row, "image": str((gen_dir / row["image"]).resolve()),
                             "mask": str(mask_path.relative_to(workdir)), "iou": iou, "quality_score": q,
                             "new_mask": str(new_path) if new_path is not None else None,
                             "eroded": _erosion_record(int(erode_px), new_path is not None)})
    for row in gen.early:  # stopped mid-sampling by the generate stage's gate: never finished, rejected
        decisions.append({"id": row["id"], "accepted": False, "iou": row.get("early_reject_iou"), "quality_score": None,
                          "reasons": [f"early_reject@t{row.get('early_reject_t')}"], "gate": "early reject (generate)"})
    write_jsonl(workdir / "decisions.jsonl", decisions)
    write_jsonl(workdir / "accepted.jsonl", acc_rows)
    return acc_rows


PREDS = "preds"  # the gate's predicted mask of each sample: preds/<id>.png (class indices)


def pred_path(sample_id: str) -> str:
    """Where a sample's predicted mask lies, relative to the stage folder."""
    return f"{PREDS}/{sample_id}.png"


def pred_writer(workdir: Path, rows: list):
    """A gate ``sink``: writes each batch's predictions (B,H,W) as ``preds/<id>.png``, keeps nothing."""
    def sink(first: int, preds: torch.Tensor) -> None:
        for k, pred in enumerate(preds):
            write_png(Path(workdir) / pred_path(rows[first + k]["id"]), pred.numpy().astype(np.uint8))
    return sink


def pred_view(workdir: Path, rows: list) -> LazyRows:
    """The predictions :func:`pred_writer` wrote, as a (N,H,W) int64 row view."""
    paths = [Path(workdir) / pred_path(r["id"]) for r in rows]
    return LazyRows(lambda pos: torch.from_numpy(np.stack([read_mask(paths[k]) for k in pos]).astype(np.int64)),
                    n=len(rows))


def _erosion_record(px: int, new_known: bool) -> dict:
    """What erosion did to an accepted mask: its radius and which pixels it applied to."""
    return {"px": px, "applied_to": "none" if px <= 0 else ("new_lesion" if new_known else "whole_label")}


def save_accept_reject(path: Path, images, masks, preds, ious: torch.Tensor, accepted: torch.Tensor,
                       per_row: int = 6) -> Path:
    """Two rows of panels, accepted then rejected: image, intended mask (green), prediction (yellow).

    Args:
        images / masks / preds: (N,3,H,W) / (N,H,W) / (N,H,W) tensors or row views (only the shown
            rows are read); ``preds`` None when the gate predicted nothing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [("accepted", accepted.nonzero().flatten()[:per_row]), ("rejected", (~accepted).nonzero().flatten()[:per_row])]
    fig = Figure(figsize=(2 * per_row, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, per_row, squeeze=False)
    for row, (name, idx) in enumerate(groups):
        for col in range(per_row):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(idx):
                continue
            i = int(idx[col])
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            if masks[i].any():
                ax.contour(masks[i].numpy() > 0, levels=[0.5], colors="lime", linewidths=1)
            if preds is not None and preds[i].any():
                ax.contour(preds[i].numpy() > 0, levels=[0.5], colors="yellow", linewidths=1)
            iou = "–" if torch.isnan(ious[i]) else f"{float(ious[i]):.2f}"
            ax.set_title(f"{name} IoU {iou}", fontsize=8, color="green" if name == "accepted" else "red")
    fig.suptitle("green: intended mask, yellow: validator prediction", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.2)  # room for the title and both rows' captions
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), fsync=False)
