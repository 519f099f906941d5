"""The label budget: validation pairs taken out of ``n_real``, and the pool of lesion-free sources.

A few-shot user has ``n_real`` labelled pairs in all. With ``data.n_val`` set, the validation
pairs that select the checkpoint and calibrate the gate come out of those ``n_real`` (``train_few``
keeps the rest), instead of a large extra validation split. Lesion-free images cost no annotation,
so ``data.n_normal`` of them form a separate, stated pool of sources (no masks used), open to every
arm that paints lesions into images.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from datamodules.errors import DataError
from datamodules.pairs import natural_key


def resolve_n_val(n_val, n_real: Optional[int], n_pool: int) -> Optional[int]:
    """Validation pairs out of the budget: a count (``4``), or a share of it (``0.25`` → ``n // 4``).

    Args:
        n_val: ``data.n_val``: ``None``, a count >= 1, or a share in (0, 1).
        n_real: The budget (``None`` = the whole pool).
        n_pool: Pairs the budget is drawn from (used when ``n_real`` is ``None``).

    Returns:
        The count, or ``None`` when ``n_val`` is ``None``.
    """
    if n_val is None:
        return None
    n = int(n_real) if n_real is not None else int(n_pool)
    count = max(1, int(float(n_val) * n)) if float(n_val) < 1 else int(n_val)
    if count >= n:
        raise DataError(f"data.n_val={n_val} leaves no training pair out of a budget of {n} labelled pairs "
                        f"(data.n_real): lower data.n_val or raise data.n_real")
    return count


def split_budget(budget: Sequence[str], groups: Mapping[str, Optional[str]], lesion: Mapping[str, bool],
                 n_val: int, seed: int) -> tuple[list, list]:
    """Split the ``n_real`` labelled pairs into ``(val, train_few)``, stratified by lesion.

    Whole groups (video sequences) go to one side, so near-duplicate frames never straddle the
    two (val may then hold a few more than ``n_val`` pairs). Where the budget holds two or more
    lesion pairs, each side gets at least one; lesion-free pairs are shared in proportion.

    Args:
        budget: The labelled pair ids.
        groups: Id -> leakage group (``None``: the pair is its own group).
        lesion: Id -> whether its mask holds a lesion (missing ids count as lesion pairs).
        n_val: Validation pairs to take (>= 1, < len(budget)).
        seed: Draws which pairs validate.

    Returns:
        ``(val ids, train_few ids)``, each sorted naturally; together exactly ``budget``.
    """
    rng = np.random.default_rng([int(seed), 2])
    members: dict = {}
    for i in sorted(budget, key=natural_key):
        g = groups.get(i)
        members.setdefault(i if g is None else g, []).append(i)
    units = list(members)
    units = [units[k] for k in rng.permutation(len(units))]
    lesion_units = [u for u in units if any(lesion.get(i, True) for i in members[u])]
    free_units = [u for u in units if u not in set(lesion_units)]
    n_lesion = sum(len(members[u]) for u in lesion_units)
    # lesion pairs in val: their share of the budget, at least one; the last lesion unit stays in train_few
    want = min(max(round(n_val * n_lesion / len(budget)), 1), n_val) if len(lesion_units) >= 2 else 0
    val: list = []

    def size() -> int:
        return sum(len(members[u]) for u in val)

    for pool, target in ((lesion_units[:-1], want), (free_units, n_val), (lesion_units[:-1], n_val)):
        for u in pool:
            if size() >= target:
                break
            if u not in val:
                val.append(u)
    if not val:  # only whole groups too large to share: one group validates
        val.append(units[0])
    val_ids = sorted((i for u in val for i in members[u]), key=natural_key)
    few = sorted((i for i in budget if i not in set(val_ids)), key=natural_key)
    return val_ids, few


def pick_normal_pool(candidates: Sequence[str], lesion: Mapping[str, bool], n_normal: int, seed: int,
                     dataset: str) -> list:
    """``n_normal`` lesion-free ids outside the budget, drawn by ``seed`` (real datasets).

    Args:
        candidates: Train ids outside the label budget (not in ``train_few`` nor ``val``).
        lesion: Id -> whether its mask holds a lesion.
        n_normal: Pool size (``data.n_normal``).
        seed: Draws the pool.
        dataset: Named in the error.

    Raises:
        DataError: fewer than ``n_normal`` lesion-free images are available.
    """
    free = sorted((i for i in candidates if not lesion.get(i, True)), key=natural_key)
    if len(free) < n_normal:
        raise DataError(f"data.n_normal={n_normal} asks for {n_normal} lesion-free images, but the train split "
                        f"of {dataset} holds only {len(free)} outside the label budget: lower data.n_normal "
                        f"(0 = no normal pool)")
    pick = np.random.default_rng([int(seed), 3]).permutation(len(free))[:n_normal]
    return sorted((free[k] for k in pick), key=natural_key)
