"""Small pure functions holding the math of ESL (spec sections 2-4).

Both the literal reference scorer and the batched engine are built from these, so the fast
paths can be checked against the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2n(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sqrt(sum x^2) + eps)`` along ``dim``: the released code's exact form.

    ``vector_norm`` has the same value as ``x.pow(2).sum().sqrt()`` but a zero (not NaN)
    gradient at an all-zero vector, which padded GRU positions produce.
    """
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


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


def t2i_attention(a: Tensor, scale: Tensor, slope: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Word-by-region attention ``(W, R)`` of one pair's affinity ``a (W, R)``.

    Row ``w`` is the softmax over regions that text-to-image pooling gives word ``w``
    (spec section 4); each row sums to 1. Used for heat-maps.
    """
    g = l2n(F.leaky_relu(torch.tanh(a), slope), dim=0, eps=eps)  # each region normalised over words
    return torch.softmax(scale * g, dim=1)


def pool_pair(a: Tensor, scale: Tensor, slope: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Bidirectional attention pooling of one pair's affinity ``a (W, R)`` to a scalar.

    Literal form of spec section 4 with no padding: every row is a real word and every
    column a real region.
    """
    p = t2i_attention(a, scale, slope, eps)  # over regions
    t2i = (a * p).sum(1).mean()
    h = l2n(F.leaky_relu(torch.tanh(a), slope), dim=1, eps=eps)  # each word normalised over regions
    q = torch.softmax(scale * h, dim=0)  # over words
    i2t = (a * q).sum(0).mean()
    return t2i + i2t


def pool_masked(
    a: Tensor,
    word_mask: Tensor,
    region_mask: Tensor,
    scale: Tensor,
    slope: float = 0.1,
    eps: float = 1e-8,
) -> Tensor:
    """Masked bidirectional attention pooling over a batch of affinity blocks.

    Args:
        a: affinities ``(..., W, R)``.
        word_mask: bool ``(..., W, 1)`` broadcastable, True for real words.
        region_mask: bool ``(..., 1, R)`` broadcastable, True for real regions.
        scale: softmax scale ``s`` (scalar tensor).
    Returns:
        scores ``(...)``. Padded words and regions take no part in any norm, softmax or mean.
    """
    valid = word_mask & region_mask
    act = F.leaky_relu(torch.tanh(a), slope).masked_fill(~valid, 0.0)
    neg = torch.finfo(a.dtype).min
    n_words = word_mask.sum(-2).clamp_min(1).to(a.dtype)  # (..., 1)
    n_regions = region_mask.sum(-1).clamp_min(1).to(a.dtype)  # (..., 1)

    g = act / (torch.linalg.vector_norm(act, dim=-2, keepdim=True) + eps)
    p = torch.softmax((scale * g).masked_fill(~region_mask, neg), dim=-1)
    t2i = ((a * p).sum(-1, keepdim=True).masked_fill(~word_mask, 0.0).sum(-2) / n_words).squeeze(-1)

    h = act / (torch.linalg.vector_norm(act, dim=-1, keepdim=True) + eps)
    q = torch.softmax((scale * h).masked_fill(~word_mask, neg), dim=-2)
    i2t = ((a * q).sum(-2, keepdim=True).masked_fill(~region_mask, 0.0).sum(-1) / n_regions).squeeze(-1)
    return t2i + i2t
