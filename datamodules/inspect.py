"""``meddiffaug data inspect``: check a dataset folder before spending compute on it.

Unlike the datamodule, which stops at the first bad file, inspection collects every problem so a
user fixes a download in one pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from datamodules import get_layout
from datamodules.pairs import load_pair, natural_key, read_raw_mask
from datamodules.splits import make_splits, official_parts, read_split_file
from datamodules.budget import pick_normal_pool
from datamodules.checks import split_problems
from datamodules.errors import DataError


def _quantiles(x: Sequence[float]) -> dict:
    if len(x) == 0:
        return {"min": None, "q1": None, "median": None, "q3": None, "max": None}
    q = np.quantile(np.asarray(x, float), [0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q1", "median", "q3", "max"), (round(float(v), 5) for v in q)))


def inspect_dataset(name: str, root, image_size: Optional[int] = None, split_seed: int = 0,
                    val_fraction: float = 0.15, test_fraction: float = 0.15,
                    small_lesion_area: float = 0.02, n_real: Optional[int] = None,
                    split_file=None, n_val=None, n_normal: int = 0, **layout_kw: Any) -> dict:
    """Decode every pair of a file-based dataset at its original size and summarise it.

    Args:
        name: Registered dataset name (file-based, e.g. ``"kvasir_seg"``).
        root: Folder in the dataset's published layout.
        image_size: If given, also count masks whose lesion vanishes when resized to it.
        split_seed, val_fraction, test_fraction: As for the datamodule, to report split sizes.
        small_lesion_area: Lesion fraction of the image under which a lesion counts as small.
        n_real: Few-shot subset size to check for a lesion (``None``: not checked).
        split_file: A split JSON to check instead of the seeded split (as ``data.split_file``).
        n_val, n_normal: The label budget (``data.n_val``: validation pairs out of ``n_real``) and
            the pool of lesion-free sources outside it (``data.n_normal``), as a run would use them.
        **layout_kw: Layout options (e.g. ``classes`` for ``folder``).

    Returns:
        Dict with keys ``dataset``, ``root``, ``n_pairs``, ``splits`` (split -> count; with
        ``n_val`` also ``train_few``, with ``n_normal`` also ``normal``),
        ``classes``, ``image_sizes``, ``mask_values`` (raw value -> pixel count),
        ``lesion_area`` and ``problems`` (list of messages; empty when all is well).
    """
    root = Path(root).expanduser()
    layout = get_layout(name)(**layout_kw)
    problems: list = []
    try:
        records = layout.find(root, problems)
    except DataError as e:  # wrong/empty folder: nothing further to inspect
        problems.append(str(e))
        records = []
    records = sorted(records, key=lambda r: natural_key(r.id))
    scan = _scan(layout, records, image_size, problems)
    good, areas, sizes, values = scan["good"], scan["areas"], scan["sizes"], scan["values"]
    max_index, present, n_lost = scan["max_index"], scan["present"], scan["n_lost"]
    classes = tuple(layout.classes_for(max_index))
    if max_index >= len(classes):
        problems.append(f"masks under {root} hold class index {max_index} but the dataset has "
                        f"classes {classes}")
    splits: dict = {}
    if good:
        splits = _split_sizes(name, root, layout, records, good, areas, present, classes, problems,
                              split_seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction,
                              n_real=n_real, split_file=split_file, n_val=n_val, n_normal=n_normal)
    elif records or not problems:
        problems.append(f"no readable image–mask pair under {root}: fix the files listed above "
                        f"or point --root at the dataset")
    nonzero = [a for a in areas if a > 0]
    lesion = {"n_empty": len(areas) - len(nonzero), **_quantiles(nonzero),
              "small_threshold": small_lesion_area,
              "n_small": sum(a < small_lesion_area for a in nonzero)}
    if image_size:
        lesion["n_lost_at_image_size"] = int(n_lost)
    wh = sorted(sizes)
    return {
        "dataset": name, "root": str(root), "n_pairs": len(good), "splits": splits,
        "classes": list(classes),
        "image_sizes": {"min": list(min(wh, key=lambda s: s[0] * s[1])) if wh else None,
                        "max": list(max(wh, key=lambda s: s[0] * s[1])) if wh else None,
                        "distinct": len(wh),
                        "counts": {f"{w}x{h}": n for (w, h), n in sizes.most_common(10)}},
        "mask_values": {str(k): int(values[k]) for k in sorted(values)},
        "lesion_area": lesion,
        "problems": problems,
    }


def _scan(layout, records: list, image_size: Optional[int], problems: list) -> dict:
    """Decode every pair once: readable pairs, lesion areas, sizes, raw mask values, classes present."""
    sizes: Counter = Counter()
    values: Counter = Counter()
    areas, good, max_index, n_lost = [], [], 0, 0
    present: set = set()
    for rec in records:
        for p in rec.mask_paths:  # raw values are counted even for masks that fail below
            try:
                v, c = np.unique(read_raw_mask(p), return_counts=True)
                values.update(dict(zip(v.tolist(), c.tolist())))
            except DataError:
                pass  # the same file fails in load_pair, which reports it
        try:
            image, mask = load_pair(layout, rec)
        except DataError as e:
            problems.append(str(e))
            continue
        good.append(rec)
        sizes[(image.shape[1], image.shape[0])] += 1
        max_index = max(max_index, int(mask.max()))
        present |= set(np.unique(mask).tolist())
        frac = float((mask > 0).mean())
        areas.append(frac)
        if image_size and frac > 0:
            small = Image.fromarray(mask).resize((image_size, image_size), Image.NEAREST)
            n_lost += not np.asarray(small).any()
    return {"good": good, "areas": areas, "sizes": sizes, "values": values, "max_index": max_index,
            "present": present, "n_lost": n_lost}


def _split_sizes(name: str, root: Path, layout, records: list, good: list, areas: list, present: set,
                 classes: tuple, problems: list, *, split_seed: int, val_fraction: float, test_fraction: float,
                 n_real, split_file, n_val, n_normal: int) -> dict:
    """Sizes of the splits a run would use over the readable pairs; their problems go to ``problems``."""
    ids = [r.id for r in good]
    try:
        official = layout.official_split(root, records)
    except DataError as e:
        problems.append(str(e))
        official = None
    if official:  # drop ids whose files failed, so the split sizes stay truthful
        keep = set(ids)
        official = {k: [i for i in v if i in keep] for k, v in official.items()}
    lesion_of = {r.id: a > 0 for r, a in zip(good, areas)}
    names = _splits(ids, good, official, split_seed, val_fraction, test_fraction, n_real,
                    split_file, problems, n_val, lesion_of)
    if names is not None and n_normal and "normal" not in names:
        try:
            names["normal"] = pick_normal_pool(sorted(set(names["train"]) - set(names["train_few"])),
                                               lesion_of, int(n_normal), split_seed, f"{name} at {root}")
        except DataError as e:
            problems.append(str(e))
    if names is None:
        return {}
    splits = {k: len(names[k]) for k in ("train", "val", "test")}
    splits.update({k: len(names[k]) for k in ("train_few", "normal")
                   if k in names and (k != "train_few" or n_val is not None)})
    problems += split_problems(names, lesion_of, present, classes, {r.id: r.group for r in good},
                               f"{name} at {root}", layout.group_kind, official_parts(official),
                               str(split_file) if split_file else None, n_real)
    return splits


def _splits(ids, good, official, seed, val_fraction, test_fraction, n_real, split_file,
            problems: list, n_val=None, lesion=None) -> Optional[dict]:
    """The splits a run would use (``None``, with the reason in ``problems``, if none)."""
    try:
        if split_file is not None and Path(split_file).exists():
            return read_split_file(Path(split_file), ids)
        return make_splits(ids, [r.group for r in good], [r.stratum for r in good], official,
                           seed, val_fraction, test_fraction, n_real, n_val=n_val, lesion=lesion)
    except DataError as e:
        problems.append(str(e))
        return None


def format_report(r: dict) -> str:
    """Human-readable summary of ``inspect_dataset``'s result."""
    la, sz = r["lesion_area"], r["image_sizes"]
    vals = r["mask_values"]
    shown = ", ".join(f"{k}: {v}" for k, v in list(vals.items())[:8])
    lines = [
        f"dataset {r['dataset']} at {r['root']}: {r['n_pairs']} pairs",
        f"  splits: {', '.join(f'{k} {v}' for k, v in r['splits'].items()) or '-'}",
        f"  classes: {', '.join(r['classes'])}",
        f"  image sizes (WxH): min {sz['min']}, max {sz['max']}, {sz['distinct']} distinct",
        f"  raw mask values ({len(vals)} distinct): {shown}{' ...' if len(vals) > 8 else ''}",
        f"  lesion area (fraction of image, non-empty masks): min {la['min']}, q1 {la['q1']}, "
        f"median {la['median']}, q3 {la['q3']}, max {la['max']}",
        f"  empty masks {la['n_empty']}, small lesions (< {la['small_threshold']:.0%}) "
        f"{la['n_small']}" + (f", lost at image size {la['n_lost_at_image_size']}"
                              if "n_lost_at_image_size" in la else ""),
    ]
    if r["problems"]:
        lines.append(f"PROBLEMS ({len(r['problems'])}):")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``meddiffaug data inspect``; returns 0, or 1 when problems were found."""
    ap = argparse.ArgumentParser(prog="meddiffaug data inspect",
                                 description="Check a dataset folder and summarise it.")
    ap.add_argument("--dataset", required=True, help="registered name, e.g. kvasir_seg or procedural_polyp")
    ap.add_argument("--root", default=None, help="folder in the dataset's published layout (file-based datasets)")
    ap.add_argument("--center", choices=("a", "b"), default="a",
                    help="procedural datasets: a (the test pool) or b (the second acquisition center)")
    ap.add_argument("--grid", default=None, help="procedural datasets: where to write the sample grid PNG "
                    "(default outputs/inspect/<dataset>_center_<center>.png)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--image-size", type=int, default=None,
                    help="also count lesions that vanish when resized to this side")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--n-real", type=int, default=None,
                    help="also check the seeded few-shot subset of this size (data.n_real)")
    ap.add_argument("--split-file", default=None, help="check this split JSON (data.split_file)")
    ap.add_argument("--n-val", type=float, default=None,
                    help="validation pairs taken out of --n-real (data.n_val: a count, or a share < 1)")
    ap.add_argument("--n-normal", type=int, default=0,
                    help="also draw the pool of lesion-free sources outside the budget (data.n_normal)")
    args = ap.parse_args(argv)
    if args.dataset.startswith("procedural_"):
        return _procedural_main(args)
    if args.root is None:
        print(f"error: --root is required for {args.dataset}: the folder holding its files", file=sys.stderr)
        return 1
    try:
        result = inspect_dataset(args.dataset, args.root, args.image_size, args.split_seed,
                                 args.val_fraction, args.test_fraction, n_real=args.n_real,
                                 split_file=args.split_file, n_val=args.n_val, n_normal=args.n_normal)
    except DataError as e:  # unknown dataset name etc.
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 1 if result["problems"] else 0


def _procedural_main(args: argparse.Namespace) -> int:
    from datamodules.inspect_procedural import format_procedural, inspect_procedural

    try:
        result = inspect_procedural(args.dataset, args.center, image_size=args.image_size or 64, grid=args.grid)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else format_procedural(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
