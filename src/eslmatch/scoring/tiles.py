"""How a score matrix is cut into tiles: caption chunks of (nearly) equal length, image tiles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

# Live tile-sized tensors per affinity element, used to size tiles against the budget.
# In place: the product and two work buffers (+ a half-size bf16 product). Autograd: the
# pooling's saved and temporary tensors (the current pooling's, not all tiles' together).
INPLACE_BUFFERS = 4
AUTOGRAD_BUFFERS = 10
# Longest padding (fraction of a chunk's rows) accepted to merge captions of unequal length.
PAD_TOLERANCE = 0.125


@dataclass
class TilePlan:
    """How a score matrix is cut: caption chunks (in length order) and image tiles.

    Attributes:
        caption_order: ``(M,)`` captions sorted by length, longest first.
        caption_chunks: ranges into ``caption_order``; each chunk is padded to its first
            (longest) caption, ``chunk_widths[k]`` words.
        chunk_widths: words per caption in each chunk.
        chunk_padded: whether a chunk holds a caption shorter than its width (known on the
            host, so the device is never asked).
        image_tiles: ranges of images.
        regions: regions per image in every tile (the longest image's length).
    """

    caption_order: Tensor
    caption_chunks: list[tuple[int, int]]
    chunk_widths: list[int]
    chunk_padded: list[bool]
    image_tiles: list[tuple[int, int]]
    regions: int

    def max_tile_elements(self) -> int:
        """Elements of the largest affinity tile ``m * W * n * R``."""
        rows = max((c1 - c0) * w for (c0, c1), w in zip(self.caption_chunks, self.chunk_widths))
        cols = max(i1 - i0 for i0, i1 in self.image_tiles) * self.regions
        return rows * cols


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
    budget_bytes: int,
    element_bytes: int = 4,
    buffers: int = INPLACE_BUFFERS,
    tile_elements: int | None = None,
    tile_columns: int | None = None,
    pad_tolerance: float = PAD_TOLERANCE,
) -> TilePlan:
    """Cut ``(N images) x (M captions)`` into tiles whose working set fits ``budget_bytes``.

    Args:
        caption_lengths: ``(M,)``; image_lengths: ``(N,)``.
        budget_bytes: bound on one tile's working set, ``buffers * element_bytes`` per
            affinity element.
        tile_elements: preferred affinity elements per tile (below the budget's bound;
            ``None``: as many as the budget allows).
        tile_columns: preferred ``n * R`` per image tile (``None``: no preference).
        pad_tolerance: largest fraction of padded rows when merging captions of different
            lengths into one chunk.
    Raises:
        InputError: the budget cannot hold one caption against one image.
    """
    order = torch.argsort(caption_lengths.cpu(), descending=True, stable=True)
    lens = caption_lengths.cpu()[order].tolist()
    n_img = int(image_lengths.numel())
    r = int(image_lengths.max())
    per_elem = element_bytes * buffers
    w_max = lens[0]
    max_elements = budget_bytes // per_elem
    if w_max * r > max_elements:
        raise InputError(
            f"memory budget of {budget_bytes} bytes is too small for a single tile "
            f"(one caption of {w_max} tokens against one image of {r} regions needs "
            f"{w_max * r * per_elem} bytes)"
        )
    target = max_elements if tile_elements is None else max(w_max * r, min(max_elements, tile_elements))
    n_tile = min(n_img, target // (w_max * r))
    if tile_columns is not None:
        n_tile = min(n_tile, max(1, tile_columns // r))
    n_tile = max(1, n_tile)
    # Spread images evenly over the tiles so the last one is not a sliver.
    n_tiles = math.ceil(n_img / n_tile)
    n_tile = math.ceil(n_img / n_tiles)
    image_tiles = [(i, min(i + n_tile, n_img)) for i in range(0, n_img, n_tile)]
    row_limit = max(w_max, target // (n_tile * r))

    chunks: list[tuple[int, int]] = []
    widths: list[int] = []
    c = 0
    while c < len(lens):
        w = lens[c]
        real = w
        end = c + 1
        while end < len(lens):
            rows = (end - c + 1) * w
            if rows > row_limit or rows - (real + lens[end]) > pad_tolerance * rows:
                break
            real += lens[end]
            end += 1
        chunks.append((c, end))
        widths.append(w)
        c = end
    padded = [lens[c1 - 1] < w for (_, c1), w in zip(chunks, widths)]
    return TilePlan(order, chunks, widths, padded, image_tiles, r)
