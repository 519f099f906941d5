"""Leakage-aware seeded splits: whole groups (patients, sequences) stay in one split, stratified.

The few-shot subset ``train_few`` is a seeded prefix of a permutation of train, so smaller
``n_real`` subsets are nested in larger ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodules.errors import DataError
from datamodules.pairs import natural_key

def _take_groups(ids, groups, strata, fractions, rng) -> list:
    """Split ``ids`` into ``len(fractions)+1`` parts by whole groups, stratified.

    Groups are shuffled within their stratum and interleaved by relative rank, so any prefix of
    the order holds the strata in proportion; parts take prefixes until they reach
    ``round(fraction * len(ids))`` (at least 1) ids. The last part (train) keeps >= 1 group.
    """
    members: dict = {}
    g_stratum: dict = {}
    for i, g, s in zip(ids, groups, strata):
        g = i if g is None else g
        members.setdefault(g, []).append(i)
        g_stratum.setdefault(g, "" if s is None else s)
    by_s: dict = {}
    for g in sorted(members, key=natural_key):
        by_s.setdefault(g_stratum[g], []).append(g)
    pos = []
    for s in sorted(by_s, key=natural_key):
        gs = by_s[s]
        for rank, k in enumerate(rng.permutation(len(gs))):
            pos.append(((rank + rng.random()) / len(gs), gs[k]))
    order = [g for _, g in sorted(pos, key=lambda t: t[0])]
    parts, n, start = [], len(ids), 0
    for frac in fractions:
        target = max(1, round(frac * n)) if frac > 0 else 0
        part: list = []
        while len(part) < target and start < len(order) - 1:
            part += members[order[start]]
            start += 1
        parts.append(part)
    parts.append([i for g in order[start:] for i in members[g]])
    return [sorted(p, key=natural_key) for p in parts]


def official_parts(official) -> set:
    """Names of the splits ``make_splits`` takes as given from an official split."""
    official = set(official or {})
    if "test" not in official and "val" in official:
        official = (official - {"val"}) | {"test"}  # official val is the held-out set
    return official if {"train", "test"} <= official else set()


def make_splits(ids, groups, strata, official, seed, val_fraction, test_fraction, n_real,
                n_val=None, lesion=None) -> dict:
    """Deterministic ``{"train", "train_few", "val", "test"}`` id lists.

    Official ``train``/``val``/``test`` are used as given; without ``val`` it is carved from the
    official train by seed; without an official test everything is split by group and stratum.
    ``train_few`` is a seeded prefix of a permutation of train (so smaller ``n_real`` subsets
    nest in larger ones) and never touches val/test.

    With ``n_val`` (the label budget, :mod:`datamodules.budget`) no validation split is carved:
    the ``n_real`` drawn pairs are the whole labelled budget, and ``val`` is ``n_val`` of them
    (stratified by ``lesion``, id -> bool), ``train_few`` the rest; an official val joins train.
    """
    rng = np.random.default_rng([int(seed), 0])
    gmap, smap = dict(zip(ids, groups)), dict(zip(ids, strata))
    official = dict(official or {})
    if "test" not in official and "val" in official:
        # An official train/val release without test labels: the official val is the held-out
        # set (never used for model selection), val is carved from train.
        official["test"] = official.pop("val")
    if n_val is not None:  # validation comes out of the budget, not from a split of its own
        val_fraction = 0.0
        if "val" in official and "test" in official:
            official["train"] = list(official.get("train", [])) + list(official.pop("val"))
    if "train" in official and "test" in official:
        train, test = list(official["train"]), list(official["test"])
        if "val" in official:
            val = list(official["val"])
        else:
            val, train = _take_groups(train, [gmap[i] for i in train], [smap[i] for i in train],
                                      [val_fraction], rng)
    else:
        test, val, train = _take_groups(ids, groups, strata, [test_fraction, val_fraction], rng)
    train, val, test = (sorted(x, key=natural_key) for x in (train, val, test))
    if n_real is None:
        few = list(train)
    else:
        if int(n_real) > len(train):
            raise DataError(f"n_real={n_real} exceeds the {len(train)} images of the train split; "
                            f"lower data.n_real or set it to null for all")
        perm = np.random.default_rng([int(seed), 1]).permutation(len(train))[: int(n_real)]
        few = sorted((train[k] for k in perm), key=natural_key)
    if n_val is not None:
        from datamodules.budget import resolve_n_val, split_budget

        val, few = split_budget(few, gmap, dict(lesion or {}), resolve_n_val(n_val, n_real, len(train)), seed)
        train = [i for i in train if i not in set(val)]
    return {"train": train, "train_few": few, "val": val, "test": test}


def read_split_file(path: Path, ids: Sequence[str]) -> dict:
    """Read a split JSON written by ``write_split``; every id must exist and splits be disjoint."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read split file {path} ({e}): delete it to re-split") from e
    if not isinstance(data, dict) or not {"train", "val", "test"} <= set(data):
        raise DataError(f"split file {path} must hold lists 'train', 'val' and 'test'")
    data.setdefault("train_few", data["train"])
    known = set(ids)
    parts = ("train", "train_few", "val", "test") + (("normal",) if "normal" in data else ())
    missing = sorted({i for k in parts for i in data[k]} - known, key=natural_key)
    if missing:
        raise DataError(f"split file {path} names ids not in the dataset: {missing[:10]}"
                        f"{' ...' if len(missing) > 10 else ''}; delete the file to re-split")
    tr, va, te = (set(data[k]) for k in ("train", "val", "test"))
    if (tr & va) or (tr & te) or (va & te) or not set(data["train_few"]) <= tr:
        raise DataError(f"split file {path} has overlapping splits (or train_few outside train)")
    if set(data.get("normal", [])) & (set(data["train_few"]) | va | te):
        raise DataError(f"split file {path} lists 'normal' (unlabelled source) ids that are also in "
                        f"train_few, val or test: the normal pool must lie outside the label budget")
    return {k: list(data[k]) for k in parts}
