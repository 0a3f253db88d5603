"""Bidirectional attention pooling (spec section 4): its learned temperature.

The pooling itself is computed by the engine (:mod:`eslmatch.scoring.pooling`, in its three
forms); this module holds the parameter it learns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AttentionPooling(nn.Module):
    """Holds the learned temperature ``t`` (softmax scale ``s = exp(t)``), the leaky slope
    and the l2 epsilon of the pooling."""

    def __init__(self, temperature_init: float = 1.0 / 0.07, slope: float = 0.1, eps: float = 1e-8) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.slope = slope
        self.eps = eps

    def scale(self) -> Tensor:
        return torch.exp(self.t)
