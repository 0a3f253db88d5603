"""Training losses (spec section 5).

The hinge triplet loss of VSE++ on a score matrix whose positives are known by index. The
square, single-process case (:func:`triplet_loss`, positives on the diagonal) is the sum of
two :func:`hinge_rows` calls; distributed training calls :func:`hinge_rows` on the blocks it
owns (its images against every caption, every image against its captions), so the hardest
negative is always searched over the whole global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hinge_rows(scores: Tensor, positives: Tensor, margin: float = 0.2, max_violation: bool = False) -> Tensor:
    """Hinge loss of each row's positive against the other entries of that row.

    Args:
        scores: ``(Q, K)`` scores, one row per query (an image or a caption).
        positives: ``(Q,)`` long, the column of each query's positive.
        margin: hinge margin.
        max_violation: keep only the hardest negative of each row (VSE++); otherwise sum
            the hinge over every negative (VSE0).
    Returns:
        scalar: the sum over rows.
    """
    if scores.dim() != 2 or positives.shape != scores.shape[:1]:
        raise ValueError(f"scores (Q, K) and positives (Q,) expected, got {tuple(scores.shape)} and {tuple(positives.shape)}")
    rows = torch.arange(scores.shape[0], device=scores.device)
    positives = positives.to(scores.device)
    pos = scores[rows, positives].unsqueeze(1)  # (Q, 1)
    cost = (margin + scores - pos).clamp(min=0)
    is_pos = torch.zeros_like(cost, dtype=torch.bool)
    is_pos[rows, positives] = True
    cost = cost.masked_fill(is_pos, 0.0)
    if max_violation:
        return cost.max(dim=1).values.sum()
    return cost.sum()


def triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = False) -> Tensor:
    """Bidirectional hinge triplet loss on a square batch, positives on the diagonal.

    Args:
        scores: ``(B, B)``, rows images, columns captions; ``scores[i, i]`` is a positive pair.
        margin: hinge margin (0.2 in the released recipe).
        max_violation: hardest negative per query (VSE++) instead of the sum (VSE0 warm-up).
    Returns:
        scalar: image-to-caption plus caption-to-image terms, summed over the batch.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"a square (B, B) score matrix is expected, got {tuple(scores.shape)}")
    diag = torch.arange(scores.shape[0], device=scores.device)
    return hinge_rows(scores, diag, margin, max_violation) + hinge_rows(scores.t(), diag, margin, max_violation)
