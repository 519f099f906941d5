"""Is this data worth a run? Checks shared by ``meddiffaug data inspect`` and the datamodule.

A run on data without a validation split, or without a single lesion, finishes "successfully" with
NaN or zero metrics that look like results. These checks turn such data into problems that name
the cause and what to do; ``data inspect`` lists them all and ``meddiffaug run`` refuses the first
before any training.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from datamodules.errors import DataError

SPLITS = ("train", "val", "test")
_FRACTION_KEY = {"val": "data.val_fraction", "test": "data.test_fraction"}


def mask_summary(masks: np.ndarray, n_classes: int) -> tuple:
    """Which samples hold a lesion and which class indices occur at all.

    Args:
        masks: uint8 (N,S,S) class indices (or a list of (H,W) arrays of varying size).
        n_classes: Number of classes (indices 0 .. n_classes-1).

    Returns:
        ``(lesion bool (N,), present set of class indices)``.
    """
    counts = np.zeros(max(int(n_classes), 1), np.int64)
    lesion = np.zeros(len(masks), bool)
    for i, m in enumerate(masks):
        c = np.bincount(np.asarray(m).ravel(), minlength=len(counts))
        lesion[i] = c[1:].sum() > 0
        counts[: len(c)] += c[: len(counts)]
    return lesion, {int(k) for k in np.nonzero(counts)[0]}


def _empty_split_reason(empty: Sequence[str], ids: Sequence[str],
                        groups: Mapping[str, Optional[str]], dataset: str,
                        group_kind: Optional[str], official: Sequence[str],
                        split_file: Optional[str]) -> str:
    """Why the ``empty`` splits came out empty, and what to do, as one sentence."""
    n = len(ids)
    what = f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty"
    if split_file:
        return (f"{what} in split file {split_file}: list at least one id there, or delete the "
                f"file to re-split by seed")
    if set(empty) & set(official):
        return (f"{what}: the official split of {dataset} (from its files) puts no readable pair "
                f"there; restore the missing files, or remove the official split files to split "
                f"by seed")
    own = sorted({g for i in ids if (g := groups.get(i)) is not None})
    if group_kind and own and len(own) < 3:
        where = (f"all {n} frames are in {group_kind} {own[0]}" if len(own) == 1 else
                 f"the {n} frames come from only {len(own)} {group_kind}s ({', '.join(own)})")
        return (f"{what}: {where}; {dataset} is split by {group_kind} (near-duplicate frames "
                f"must not straddle splits), so at least 3 {group_kind}s are needed; add frames "
                f"of other {group_kind}s, give your own split with data.split_file (JSON lists "
                f"train, val, test), or use data.name=folder with images/ + masks/ (split by "
                f"frame)")
    if n < 3:
        return (f"{what}: {dataset} has only {n} pair(s), and at least 3 are needed (one each "
                f"for train, validation and test); add pairs")
    keys = [_FRACTION_KEY[s] for s in empty if s in _FRACTION_KEY]
    return (f"{what} ({dataset} has {n} pairs): "
            + (f"raise {' and '.join(keys)}" if "train" not in empty else
               "lower data.val_fraction and data.test_fraction"))


def split_problems(split_ids: Mapping[str, Sequence[str]], lesion: Mapping[str, bool],
                   present: set, classes: Sequence[str], groups: Mapping[str, Optional[str]],
                   dataset: str, group_kind: Optional[str] = None, official: Sequence[str] = (),
                   split_file: Optional[str] = None, n_real: Optional[int] = None) -> list:
    """Everything that makes a run on these splits meaningless, one message per problem.

    Args:
        split_ids: ``{"train", "val", "test"[, "train_few"]}`` -> sample ids.
        lesion: Sample id -> whether its mask holds any non-background pixel.
        present: Class indices found in any mask.
        classes: Class names, index 0 = background.
        groups: Sample id -> leakage group (video sequence), ``None`` for ungrouped samples.
        dataset: Name used in messages (e.g. ``"cvc_clinicdb at /data/cvc"``).
        group_kind: What a group is (``"video sequence"``), or ``None`` when ungrouped.
        official: Splits taken as given from the dataset's official split files.
        split_file: The split JSON the splits were read from, if any.
        n_real: The few-shot size that made ``train_few`` (``None`` = all of train).

    Returns:
        Messages (empty when the data can give a meaningful run).
    """
    problems = []
    all_ids = [i for s in SPLITS for i in split_ids.get(s, [])]
    empty = [s for s in SPLITS if not split_ids.get(s)]
    if empty:
        problems.append(_empty_split_reason(empty, all_ids, groups, dataset, group_kind,
                                            official, split_file))
    if all_ids and not any(lesion.get(i, False) for i in all_ids):
        problems.append(f"no mask of {dataset} holds a lesion (all {len(all_ids)} masks are "
                        f"empty): there is nothing to segment; check that the masks are the "
                        f"right files (a lesion is any non-background value)")
        return problems
    missing = [f"{classes[k]!r} (index {k})" for k in range(1, len(classes)) if k not in present]
    if missing and len(missing) < len(classes) - 1:
        problems.append(f"no mask of {dataset} holds class {', '.join(missing)} of "
                        f"{tuple(classes)}: a class without examples cannot be learnt or "
                        f"scored; fix the masks or the dataset's class list")
    for split in SPLITS:
        ids = split_ids.get(split) or []
        if ids and not any(lesion.get(i, False) for i in ids):
            problems.append(f"the {split} split of {dataset} ({len(ids)} pairs) holds no lesion, "
                            f"so its Dice is meaningless; change data.split_seed, or add lesion "
                            f"images")
    few = split_ids.get("train_few")
    if few and n_real is not None and not any(lesion.get(i, False) for i in few):
        problems.append(f"the few-shot subset of {dataset} (data.n_real={n_real}) holds no lesion: "
                        f"nothing to learn from; raise data.n_real or change data.split_seed")
    return problems


def raise_first(problems: Sequence[str], hint: str = "") -> None:
    """Raise ``DataError`` with the first problem (and how many more there are), if any."""
    if problems:
        more = f" ({len(problems) - 1} more problem(s){hint})" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
