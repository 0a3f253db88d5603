"""A small, literal reference scorer: one pair at a time, easy to read, slow.

It follows spec sections 1-4 step by step: each image and caption is encoded alone (cut to
its real length, so there is no padding anywhere), each level's affinity is
``X_l @ D_l @ Y_l^T``, the levels are summed, and the pair is pooled by
:func:`eslmatch.model.functional.pool_pair`. Tests hold the batched engine equal to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .model.esl import ESLModel
from .model.functional import pool_pair


def pair_affinity(model: ESLModel, cap_feats: Tensor, img_feats: Tensor) -> Tensor:
    """Word-region affinity ``(W, R)`` of one caption ``(W, Dt)`` and one image ``(R, Dt)``."""
    xs = model.text_levels.split(cap_feats)
    ys = model.image_levels.split(img_feats)
    ds = model.correspondence.matrices()
    return sum(x @ d @ y.t() for x, d, y in zip(xs, ds, ys))


@torch.no_grad()
def reference_similarity(
    model: ESLModel,
    images: Tensor,
    image_lengths: Tensor | Sequence[int] | None,
    captions: Tensor,
    caption_lengths: Tensor | Sequence[int],
) -> Tensor:
    """Scores ``(N, M)`` computed pair by pair with no padding and no batching."""
    n, r, _ = images.shape
    img_len = [r] * n if image_lengths is None else [int(x) for x in image_lengths]
    cap_len = [int(x) for x in caption_lengths]
    img_feats = [model.embed_images(images[i : i + 1, : img_len[i]])[0] for i in range(n)]
    cap_feats = [model.embed_captions(captions[j : j + 1, : cap_len[j]], [cap_len[j]])[0] for j in range(len(cap_len))]
    scale = model.pooling.scale()
    out = torch.zeros(n, len(cap_len), dtype=img_feats[0].dtype)
    for i, y in enumerate(img_feats):
        for j, x in enumerate(cap_feats):
            a = pair_affinity(model, x, y)
            out[i, j] = pool_pair(a, scale, model.pooling.slope, model.pooling.eps)
    return out
