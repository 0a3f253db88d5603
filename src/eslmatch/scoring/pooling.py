"""Bidirectional attention pooling (spec section 4) over one tile of affinities.

A tile is the product of ``m`` captions padded to ``W`` words and ``n`` images padded to
``R`` regions, laid out as the matrix product leaves it: ``a (m, W, n, R)``. Both pooling
directions share one ``tanh`` and one squared activation; the softmaxes need no division
per element (each row's numerator ``sum a * exp`` and denominator ``sum exp`` are reduced
and divided once per row).

Padding is handled without masks over the full tile: the engine zeroes padded words and
regions *before* the product, so their affinities, activations and contributions to every
norm are exactly 0. What remains is to keep them out of the two softmaxes, which an additive
bias does (``word_bias (m, W, 1, 1)``, ``region_bias (1, 1, n, R)``: 0 for real positions and
a huge negative number for padding, ``None`` when a tile has none), and to divide each mean
by the real counts.

The pooling in its three forms, side by side (tests hold them equal):

- :func:`pool_pair` : the literal reference, one pair ``(W, R)`` with no padding, as the
  spec writes it (with :func:`t2i_attention`, the word-by-region weights for heat-maps).
- :func:`pool_tile_` : the fused form, in place on preallocated buffers, no autograd
  (evaluation and retrieval).
- :func:`pool_tile` : the differentiable form, out of place (training; on CUDA through
  ``torch.compile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.tensors import l2n

# Softmax arguments are ``s * g`` with ``|g| <= 1``, so for ``s`` up to this bound ``exp``
# cannot overflow (e^40 ~ 2.4e17, times any affinity and any row length) and the max
# subtraction of a textbook softmax can be skipped; above it the rows are shifted by their max.
UNSHIFTED_SCALE_LIMIT = 40.0
# Lower bound of a sum of squares before the square root: changes nothing for any real
# column, but keeps the gradient of an all-zero (padded) column finite.
_TINY = 1e-30


# ---------------------------------------------------------------------------- the literal reference
def t2i_attention(a: Tensor, scale: Tensor | float, slope: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Word-by-region attention ``(W, R)`` of one pair's affinity ``a (W, R)``.

    Row ``w`` is the softmax over regions that text-to-image pooling gives word ``w``
    (spec section 4); each row sums to 1. Used for heat-maps.
    """
    g = l2n(F.leaky_relu(torch.tanh(a), slope), dim=0, eps=eps)  # each region normalised over words
    return torch.softmax(scale * g, dim=1)


def pool_pair(a: Tensor, scale: Tensor | float, slope: float = 0.1, eps: float = 1e-8) -> Tensor:
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


# ---------------------------------------------------------------------------- the tiled forms
def padding_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``0`` where ``valid`` is True, the most negative finite ``dtype`` value elsewhere."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid, torch.finfo(dtype).min)


def fast_tanh_(x: Tensor, out: Tensor) -> Tensor:
    """``tanh(x)`` as ``2 * sigmoid(2x) - 1`` into ``out`` (about 3x cheaper on CPU).

    Absolute error ~2e-7, so it is used only with reduced-precision products, whose own
    error is orders of magnitude larger.
    """
    torch.mul(x, 2.0, out=out)
    return out.sigmoid_().mul_(2.0).sub_(1.0)


def _inv_norms(sq: Tensor, dim: int, scale: float | Tensor, eps: float) -> Tensor:
    """``scale / (sqrt(sum sq over dim) + eps)`` keeping ``dim`` (a small tensor)."""
    return scale / (sq.sum(dim, keepdim=True).clamp_min(_TINY).sqrt() + eps)


@torch.no_grad()
def pool_tile_(
    a: Tensor,
    work_t: Tensor,
    work_e: Tensor,
    word_lengths: Tensor,
    region_lengths: Tensor,
    scale: float,
    slope: float = 0.1,
    eps: float = 1e-8,
    word_bias: Tensor | None = None,
    region_bias: Tensor | None = None,
    fast_tanh: bool = False,
) -> Tensor:
    """In-place pooling of one tile; ``a`` is left intact, the work buffers are overwritten.

    Args:
        a: affinities ``(m, W, n, R)``, exactly 0 at padded words and regions.
        work_t, work_e: scratch tensors with ``a``'s shape and layout.
        word_lengths: ``(m, 1)`` real words per caption, ``a``'s dtype.
        region_lengths: ``(1, n)`` real regions per image, ``a``'s dtype.
        scale: softmax scale ``s``.
        word_bias, region_bias: softmax padding biases (see the module doc) or ``None``.
        fast_tanh: use :func:`fast_tanh_` (reduced-precision modes only).
    Returns:
        scores ``(m, n)``.
    """
    t, e = work_t, work_e
    if fast_tanh:
        fast_tanh_(a, t)
    else:
        torch.tanh(a, out=t)
    F.leaky_relu_(t, slope)  # the activation shared by both directions
    torch.mul(t, t, out=e)
    inv_col = _inv_norms(e, 1, scale, eps)  # (m, 1, n, R): each region over words
    inv_row = _inv_norms(e, 3, scale, eps)  # (m, W, n, 1): each word over regions
    shifted = scale > UNSHIFTED_SCALE_LIMIT

    # text-to-image: softmax over regions, per word
    if region_bias is None:
        torch.mul(t, inv_col, out=e)
    else:
        torch.addcmul(region_bias, t, inv_col, out=e)
    if shifted:
        e.sub_(e.amax(3, keepdim=True))
    e.exp_()
    den = e.sum(3)
    t2i = e.mul_(a).sum(3).div_(den).sum(1)  # (m, n); padded words add exactly 0

    # image-to-text: softmax over words, per region (t is free after this product)
    if word_bias is None:
        torch.mul(t, inv_row, out=e)
    else:
        torch.addcmul(word_bias, t, inv_row, out=e)
    if shifted:
        e.sub_(e.amax(1, keepdim=True))
    e.exp_()
    den = e.sum(1)
    i2t = e.mul_(a).sum(1).div_(den).sum(2)  # (m, n); padded regions add exactly 0
    return t2i.div_(word_lengths).add_(i2t.div_(region_lengths))


def pool_tile(
    a: Tensor,
    word_lengths: Tensor,
    region_lengths: Tensor,
    scale: Tensor | float,
    slope: float = 0.1,
    eps: float = 1e-8,
    word_bias: Tensor | None = None,
    region_bias: Tensor | None = None,
) -> Tensor:
    """Out-of-place, differentiable twin of :func:`pool_tile_` (same arguments, no buffers).

    Returns:
        scores ``(m, n)``.
    """
    act = F.leaky_relu(torch.tanh(a), slope)
    sq = act * act
    g = act * _inv_norms(sq, 1, scale, eps)
    h = act * _inv_norms(sq, 3, scale, eps)
    if region_bias is not None:
        g = g + region_bias
    if word_bias is not None:
        h = h + word_bias
    t2i = (a * torch.softmax(g, dim=3)).sum(3).sum(1)
    i2t = (a * torch.softmax(h, dim=1)).sum(1).sum(2)
    return t2i / word_lengths + i2t / region_lengths
