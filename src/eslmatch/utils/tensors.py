"""Masks and masked reductions over padded batches."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_mask(lengths: Tensor, width: int) -> Tensor:
    """``(N,)`` lengths -> bool ``(N, width)`` mask, True for positions < length."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``x (N, T, D)`` over the first ``lengths[n]`` positions -> ``(N, D)``."""
    mask = lengths_to_mask(lengths.to(x.device), x.shape[1]).to(x.dtype)
    return (x * mask[..., None]).sum(1) / lengths.to(x.device).clamp_min(1).to(x.dtype)[:, None]


def l2n(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sqrt(sum x^2) + eps)`` along ``dim``: the released code's exact form.

    ``vector_norm`` has the same value as ``x.pow(2).sum().sqrt()`` but a zero (not NaN)
    gradient at an all-zero vector, which padded GRU positions produce.
    """
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)
