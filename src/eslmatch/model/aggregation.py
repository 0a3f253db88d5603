"""Intra-modal multi-dimensional aggregators (spec section 2).

One :class:`LevelStack` per modality loops over its levels. The image stack feeds each level
the normalised previous level; the text stack feeds it the raw (un-normalised) previous
level. The two differ only through the epsilon of ``l2n``, which the released checkpoints'
scores depend on, so the chaining is a constructor argument, not a copy of the class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import adaptive_selection, heuristic_apply, heuristic_kernel, heuristic_matrix, l2n


class AdaptiveLevel(nn.Module):
    """ESL-A level: a learned ``(n_out, n_in)`` matrix, row-normalised and sparsified."""

    def __init__(self, n_in: int, n_out: int, select: int = 2, eps: float = 1e-8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))  # N(0, 1) like nn.Embedding
        self.select = select
        self.eps = eps

    def matrix(self) -> Tensor:
        """The effective ``(n_out, n_in)`` map."""
        return adaptive_selection(self.weight, self.select, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix().t()


class HeuristicLevel(nn.Module):
    """ESL-H level: stride-k Conv1d over the feature axis, C output channels summed."""

    def __init__(self, n_in: int, kernel_size: int, channels: int = 4) -> None:
        super().__init__()
        conv = nn.Conv1d(1, channels, kernel_size, stride=kernel_size, bias=False)
        self.weight = nn.Parameter(conv.weight.detach().clone())  # (C, 1, k), Conv1d's init
        self.n_in = n_in

    def matrix(self) -> Tensor:
        return heuristic_matrix(heuristic_kernel(self.weight), self.n_in)

    def forward(self, x: Tensor) -> Tensor:
        return heuristic_apply(x, heuristic_kernel(self.weight))


class LevelStack(nn.Module):
    """Aggregator stack mapping ``(..., E)`` embeddings to ``(..., Dt)`` level features.

    Args:
        dims: level widths ``[n_0, ..., n_L]``.
        strategy: ``"adaptive"`` or ``"heuristic"``.
        feed_normalized: True for images (``F_l = l2n(A_l(F_{l-1}))``), False for text
            (``G_l = A_l(G_{l-1})``, ``F_l = l2n(G_l)``).
    """

    def __init__(
        self,
        dims: list[int],
        strategy: str,
        feed_normalized: bool,
        kernel_size: int = 2,
        heuristic_channels: int = 4,
        adaptive_select: int = 2,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.dims = list(dims)
        self.strategy = strategy
        self.feed_normalized = feed_normalized
        self.eps = eps
        levels: list[nn.Module] = []
        for n_in, n_out in zip(dims[:-1], dims[1:]):
            if strategy == "adaptive":
                levels.append(AdaptiveLevel(n_in, n_out, adaptive_select, eps))
            else:
                levels.append(HeuristicLevel(n_in, kernel_size, heuristic_channels))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., E)``, already l2-normalised (level 0) -> ``(..., Dt)``."""
        outs = [x]
        prev = x
        for level in self.levels:
            raw = level(prev)
            out = l2n(raw, eps=self.eps)
            outs.append(out)
            prev = out if self.feed_normalized else raw
        return torch.cat(outs, dim=-1)

    def split(self, feats: Tensor) -> list[Tensor]:
        """Split ``(..., Dt)`` level features back into ``[F_0, ..., F_L]``."""
        return list(torch.split(feats, self.dims, dim=-1))
