"""The order of training batches: a pure function of ``(seed, epoch)``, so a resume is exact."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    return n_items // batch_size


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The caption order of ``epoch``: a permutation fixed by ``(seed, epoch)`` alone."""
    return np.random.default_rng([seed, epoch]).permutation(n_items)


class EpochBatchSampler:
    """Batches of caption indices of one epoch, from batch ``start`` on.

    Global batch ``k`` holds ``epoch_order(...)[k*B:(k+1)*B]``; each process takes its
    contiguous slice (``share``), so N processes together see exactly the global batch.
    """

    def __init__(
        self, n_items: int, batch_size: int, seed: int, epoch: int, start: int = 0, share: slice = slice(None)
    ) -> None:
        self.order = epoch_order(n_items, seed, epoch)
        self.batch_size = batch_size
        self.steps = steps_per_epoch(n_items, batch_size)
        self.start = start
        self.share = share

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for k in range(self.start, self.steps):
            yield self.order[k * b : (k + 1) * b][self.share].tolist()
