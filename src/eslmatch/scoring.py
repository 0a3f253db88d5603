"""The all-pairs scoring engine: every caption against every image, tiled, memory-bounded.

The image side is transformed once per image (``Z = Y_cat @ blockdiag(D)^T``, width Dt), so
one matrix product per tile covers every level. Captions are sorted by length and tiled so
that padding costs almost nothing and the ``N x M x W x R`` affinity tensor never exists
whole: each tile's working set stays within ``budget_bytes``. The same code runs on CPU and
CUDA, with or without autograd (training scores its batch through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .model.functional import pool_masked

# Live fp32 tensors of the size of one affinity tile during pooling (affinity, activations,
# two normalised copies, two softmaxes and products); used to size tiles.
_TEMPS_PER_ELEMENT = 10
DEFAULT_BUDGET_BYTES = 1 << 30


@dataclass
class TilePlan:
    """How a score matrix is cut: caption chunks (in length order) and image tiles."""

    caption_order: Tensor  # (M,) captions sorted by length, longest first
    caption_chunks: list[tuple[int, int]]  # ranges into caption_order
    image_tiles: list[tuple[int, int]]


def check_lengths(lengths: Tensor, width: int, what: str) -> None:
    """Refuse lengths outside ``1..width`` with an error naming the first bad row."""
    if lengths.dim() != 1:
        raise InputError(f"{what} lengths must be 1-D, got shape {tuple(lengths.shape)}")
    bad = ((lengths < 1) | (lengths > width)).nonzero()
    if bad.numel():
        i = int(bad[0])
        value = int(lengths[i])
        if value < 1:
            raise InputError(f"{what} {i} has length {value}: an all-padding {what} cannot be scored")
        raise InputError(f"{what} {i} has length {value}, beyond the tensor's {width} positions")


def plan_tiles(
    caption_lengths: Tensor,
    image_lengths: Tensor,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    element_bytes: int = 4,
) -> TilePlan:
    """Choose tiles so one tile's pooling working set fits ``budget_bytes``."""
    order = torch.argsort(caption_lengths.cpu(), descending=True, stable=True)
    lens = caption_lengths.cpu()[order].tolist()
    n_img = int(image_lengths.numel())
    r = int(image_lengths.max())
    per_elem = element_bytes * _TEMPS_PER_ELEMENT
    w_max = lens[0]
    if w_max * r * per_elem > budget_bytes:
        raise InputError(
            f"memory budget of {budget_bytes} bytes is too small for a single tile "
            f"(one caption of {w_max} tokens against one image of {r} regions needs "
            f"{w_max * r * per_elem} bytes)"
        )
    n_tile = max(1, min(n_img, budget_bytes // (w_max * r * per_elem)))
    image_tiles = [(i, min(i + n_tile, n_img)) for i in range(0, n_img, n_tile)]
    chunks = []
    c = 0
    while c < len(lens):
        m = max(1, budget_bytes // (n_tile * lens[c] * r * per_elem))
        chunks.append((c, min(c + m, len(lens))))
        c += m
    return TilePlan(order, chunks, image_tiles)


def score_tiles(
    caption_feats: Tensor,
    caption_lengths: Tensor,
    image_side: Tensor,
    image_lengths: Tensor,
    scale: Tensor,
    slope: float = 0.1,
    eps: float = 1e-8,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Tensor:
    """Scores of every (image, caption) pair.

    Args:
        caption_feats: caption level features ``(M, W, Dt)``.
        caption_lengths: ``(M,)`` real tokens per caption (>= 1).
        image_side: transformed image level features ``(N, R, Dt)`` (see
            :meth:`eslmatch.model.correspondence.Correspondence.image_side`).
        image_lengths: ``(N,)`` real regions per image (>= 1).
        scale: pooling softmax scale ``s``.
    Returns:
        ``(N, M)`` scores, rows images, columns captions.
    """
    m_caps, w_all, dt = caption_feats.shape
    n_img, r_all, dt_img = image_side.shape
    if dt != dt_img:
        raise InputError(f"caption features have width {dt} but image features {dt_img}")
    check_lengths(caption_lengths, w_all, "caption")
    check_lengths(image_lengths, r_all, "image")
    device = caption_feats.device
    caption_lengths = caption_lengths.to(device)
    image_lengths = image_lengths.to(device)
    plan = plan_tiles(caption_lengths, image_lengths, budget_bytes, caption_feats.element_size())
    order = plan.caption_order.to(device)
    out = caption_feats.new_zeros(n_img, m_caps)
    for i0, i1 in plan.image_tiles:
        r = int(image_lengths[i0:i1].max())
        z = image_side[i0:i1, :r]
        n = i1 - i0
        region_mask = (torch.arange(r, device=device)[None, :] < image_lengths[i0:i1, None])[None, :, None, :]
        z_flat = z.reshape(n * r, dt).t()
        for c0, c1 in plan.caption_chunks:
            idx = order[c0:c1]
            lens = caption_lengths[idx]
            w = int(lens.max())
            x = caption_feats[idx, :w]
            m = c1 - c0
            a = (x.reshape(m * w, dt) @ z_flat).view(m, w, n, r).transpose(1, 2)  # (m, n, W, R)
            word_mask = (torch.arange(w, device=device)[None, :] < lens[:, None])[:, None, :, None]
            s = pool_masked(a, word_mask, region_mask, scale, slope, eps)  # (m, n)
            out[i0:i1, idx] = s.t()
    return out
