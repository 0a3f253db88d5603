"""Bidirectional attention pooling (spec section 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import pool_masked


class AttentionPooling(nn.Module):
    """Pool word-region affinities ``(..., W, R)`` to scores ``(...)``.

    Holds the learned temperature ``t`` (``s = exp(t)``).
    """

    def __init__(self, temperature_init: float = 1.0 / 0.07, slope: float = 0.1, eps: float = 1e-8) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.slope = slope
        self.eps = eps

    def scale(self) -> Tensor:
        return torch.exp(self.t)

    def forward(self, affinity: Tensor, word_mask: Tensor, region_mask: Tensor) -> Tensor:
        return pool_masked(affinity, word_mask, region_mask, self.scale(), self.slope, self.eps)
