"""A set of samples read a few rows at a time: ``view[i:j]`` loads those rows, the set is never held.

The validate stage walks the generated samples and the real images in batches (gate, quality filter,
figures); at 512 px one sample is 3 MiB as float, so the whole set would grow with the data.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

Load = Callable[[np.ndarray], torch.Tensor]


class LazyRows:
    """Rows of a (N, ...) tensor produced by ``load`` only for the rows indexed.

    ``view[k]`` is one row, ``view[i:j]``, ``view[[k, ...]]`` and ``view[bool or int tensor]`` a tensor of
    those rows; ``view.take(rows)`` a view on those rows, nothing loaded. ``shape`` and ``dtype`` come
    from one loaded row.

    Args:
        load: positions (int64 array, any length) -> tensor (len(positions), ...).
        n: the number of rows (positions 0..n-1), or ``positions``: the rows this view shows.
    """

    def __init__(self, load: Load, n: Optional[int] = None, positions: Optional[Sequence[int]] = None):
        if (n is None) == (positions is None):
            raise ValueError("give LazyRows either n or positions")
        self.load = load
        self.positions = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        self._template: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.positions)

    def _rows(self, index) -> np.ndarray:
        if torch.is_tensor(index):
            index = index.cpu().numpy()
        return self.positions[index]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.load(self.positions[[index]])[0]
        if torch.is_tensor(index) and index.dim() == 0:
            return self[int(index)]
        rows = np.atleast_1d(self._rows(index))
        if not len(rows):
            return self.template.new_zeros((0, *self.template.shape[1:]))
        return self.load(rows)

    def take(self, index) -> "LazyRows":
        """A view on the rows ``index`` selects (same indexing as ``view[index]``), nothing loaded."""
        view = LazyRows(self.load, positions=np.atleast_1d(self._rows(index)))
        # an empty view still answers shape and dtype: from a row of this one
        view._template = self.template if not len(view) and len(self) else self._template
        return view

    @property
    def template(self) -> torch.Tensor:
        """One row as a (1, ...) tensor (loaded once; needs a non-empty view or its parent's row)."""
        if self._template is None:
            if not len(self.positions):
                raise ValueError("an empty LazyRows has no row shape")
            self._template = self.load(self.positions[:1])
        return self._template

    @property
    def shape(self) -> tuple:
        return (len(self), *self.template.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.template.dtype
