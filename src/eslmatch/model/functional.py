"""Small pure functions holding the math of ESL (spec sections 2-4).

The level stacks and the correspondence are built from these; the pooling's forms live in
:mod:`eslmatch.scoring.pooling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.tensors import l2n


def adaptive_selection(weight: Tensor, select: int = 2, eps: float = 1e-8) -> Tensor:
    """Sparse adaptive level matrix ``P_l`` (spec section 2).

    Args:
        weight: learned matrix ``(n_l, n_{l-1})``.
        select: how many entries survive per row (ties with the cut-off survive too).
    Returns:
        ``(n_l, n_{l-1})``: rows l2-normalised, entries below the row's ``select``-th largest
        (signed) value set to zero.
    """
    p = l2n(weight, dim=-1, eps=eps)
    k = min(select, p.shape[1])
    cutoff = p.sort(dim=1, descending=True).values[:, k - 1 : k]
    return p * (p >= cutoff).to(p.dtype)


def heuristic_kernel(conv_weight: Tensor) -> Tensor:
    """Sum a ``(C, 1, k)`` Conv1d weight over its output channels to one ``(k,)`` kernel.

    A stride-k convolution with C channels whose outputs are summed equals one stride-k
    convolution with the summed kernel.
    """
    return conv_weight.sum(dim=(0, 1))


def heuristic_apply(x: Tensor, kernel: Tensor) -> Tensor:
    """Strided (stride = kernel size) 1-D convolution along the last axis.

    ``x (..., n)`` and ``kernel (k,)`` -> ``(..., n // k)``; new dim j = sum_t K[t] x[j*k+t].
    """
    k = kernel.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // k, k) * kernel).sum(-1)


def heuristic_matrix(kernel: Tensor, n_in: int) -> Tensor:
    """The ``(n_in // k, n_in)`` matrix equal to :func:`heuristic_apply` with ``kernel``."""
    k = kernel.shape[0]
    n_out = n_in // k
    eye = torch.eye(n_out, dtype=kernel.dtype, device=kernel.device)
    return (eye[:, :, None] * kernel[None, None, :]).reshape(n_out, n_in)


def contribution_degrees(w: Tensor, sigma: Tensor, t2: Tensor, heuristic: bool) -> Tensor:
    """Sparse contribution degrees ``c_l`` (spec section 3).

    Args:
        w: learned ``(L+1,)`` weights; sigma, t2: learned scalars (any shape with one element).
        heuristic: ESL-H uses ``exp((|w|-thr) * exp(t2)) * w``; ESL-A uses ``w`` itself.
    Returns:
        ``(L+1,)``.
    """
    if not heuristic:
        return w
    a = w.abs()
    thr = (a.max() - a.min()) * sigma.reshape(()) + a.min()
    lam = torch.exp(t2.reshape(()))
    return torch.exp((a - thr) * lam) * w


def correspondence_matrix(s: Tensor, ln_weight: Tensor, ln_bias: Tensor, c: Tensor, eps: float) -> Tensor:
    """``D_l = LayerNorm_over_whole_matrix(S_l) * c_l``; ``s`` is ``(n, n)``."""
    return F.layer_norm(s, s.shape, ln_weight, ln_bias, eps) * c
