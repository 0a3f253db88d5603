"""The ESL model: encoders, level stacks, correspondence and pooling put together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ESLConfig
from ..errors import InputError
from ..scoring import PoolingParams, ScoringOptions, pool_pair, score_tiles, t2i_attention
from ..utils import masked_mean
from .aggregation import LevelStack
from .base import RegionTextModel, as_lengths
from .correspondence import Correspondence
from .pooling import AttentionPooling


class ESLModel(RegionTextModel):
    """Enhanced Semantic Similarity Learning for image-text matching.

    Build with :meth:`from_config` (new weights), :meth:`from_pretrained` (our format) or
    :func:`eslmatch.load_official_checkpoint` (the authors' released ``.pth.tar``).

    Args:
        config: every hyper-parameter.
        text_backbone: the transformers model of a ``"bert"`` text encoder.
        tokenizer: a transformers tokenizer or a :class:`~eslmatch.text.WordVocab`
            (optional: only needed to score raw text).
    """

    family = "esl"
    exact_index = False  # the index vectors give the mean affinity: a shortlist to re-rank

    def __init__(self, config: ESLConfig, text_backbone: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__(config, text_backbone, tokenizer)
        c = config
        dims = c.level_dims
        stack: dict[str, Any] = dict(
            strategy=c.strategy,
            kernel_size=c.kernel_size,
            heuristic_channels=c.heuristic_channels,
            adaptive_select=c.adaptive_select,
            eps=c.l2_eps,
        )
        self.image_levels = LevelStack(dims, feed_normalized=True, **stack)
        self.text_levels = LevelStack(dims, feed_normalized=False, **stack)
        self.correspondence = Correspondence(
            dims, c.strategy == "heuristic", c.contribution_init, c.sigma_init, c.t2_init, c.layernorm_eps
        )
        self.pooling = AttentionPooling(c.temperature_init, c.leaky_slope, c.l2_eps)

    def parts(self) -> dict[str, nn.Module]:
        return {
            "image_encoder": self.image_encoder,
            "text_encoder": self.text_encoder,
            "image_levels": self.image_levels,
            "text_levels": self.text_levels,
            "correspondence": self.correspondence,
            "pooling": self.pooling,
        }

    # ------------------------------------------------------------------ public API
    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Image level features ``(N, R, Dt)``, ready to cache and pass to :meth:`score`."""
        return self.image_levels(self.encode_images(images, image_lengths))

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Caption level features ``(M, W, Dt)``, ready to cache and pass to :meth:`score`."""
        return self.text_levels(self.encode_captions(captions, caption_lengths))

    def prepare_images(self, image_emb: Tensor) -> Tensor:
        """Correspondence-transformed image side ``(N, R, Dt)`` used by the engine."""
        return self.correspondence.image_side(image_emb)

    def index_vectors_images(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """First-stage image vectors ``(N, Dt)``: the mean over valid regions of the
        correspondence-transformed level features.

        ESL's affinity is bilinear, so the mean affinity of a pair over its words and regions is
        ``mean_w(X) @ blockdiag(D) @ mean_r(Y)^T``: an exact inner product of these vectors
        and :meth:`index_vectors_captions`, usable by any inner-product index (a shortlist
        that the full score re-ranks; trained by the auxiliary loss when
        ``global_loss_weight > 0``).
        """
        n, r, _ = image_emb.shape
        return masked_mean(self.prepare_images(image_emb.to(self.device)), as_lengths(image_lengths, n, r, self.device))

    def index_vectors_captions(self, caption_emb: Tensor, caption_lengths: Tensor | Sequence[int] | None) -> Tensor:
        """First-stage caption vectors ``(M, Dt)``: the mean of the level features over real words."""
        m, w, _ = caption_emb.shape
        return masked_mean(caption_emb.to(self.device), as_lengths(caption_lengths, m, w, self.device))

    def pooling_params(self) -> PoolingParams:
        """Softmax scale, leaky slope and l2 epsilon of the attention pooling."""
        return PoolingParams(self.pooling.scale(), self.pooling.slope, self.pooling.eps)

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Scores ``(N, M)`` from cached level features (:meth:`embed_images`, :meth:`embed_captions`)."""
        self._check_levels(image_emb, "image_emb")
        return self.score_prepared(
            self.prepare_images(image_emb.to(self.device)), image_lengths, caption_emb, caption_lengths, options
        )

    def score_prepared(
        self,
        image_side: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Scores ``(N, M)`` from prepared images (:meth:`prepare_images`, as a gallery index
        stores them) and caption level features ``(M, W, Dt)``: the all-pairs engine."""
        self._check_levels(image_side, "image_side")
        self._check_levels(caption_emb, "caption_emb")
        n, r, _ = image_side.shape
        m, w, _ = caption_emb.shape
        return score_tiles(
            caption_emb.to(self.device),
            as_lengths(caption_lengths, m, w, self.device),
            image_side.to(self.device),
            as_lengths(image_lengths, n, r, self.device),
            self.pooling_params(),
            options,
        )

    def attention(self, caption_emb: Tensor, image_side: Tensor) -> Tensor:
        """Word-by-region attention ``(W, R)`` of one caption's real words ``(W, Dt)`` over one
        prepared image's real regions ``(R, Dt)`` (each row sums to 1; for heat-maps)."""
        p = self.pooling_params()
        return t2i_attention(caption_emb @ image_side.t(), p.scale, p.slope, p.eps)

    @torch.no_grad()
    def reference_similarity(
        self,
        images: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        captions: Tensor,
        caption_lengths: Tensor | Sequence[int],
    ) -> Tensor:
        """Scores ``(N, M)`` computed pair by pair, literally: slow, easy to read.

        Each image and caption is encoded alone, cut to its real length (no padding
        anywhere); each level's affinity is ``X_l @ D_l @ Y_l^T``, the levels are summed and
        the pair is pooled by :func:`eslmatch.scoring.pooling.pool_pair`. Tests hold the
        batched engine equal to it.
        """
        n, r, _ = images.shape
        img_len = [r] * n if image_lengths is None else [int(x) for x in image_lengths]
        cap_len = [int(x) for x in caption_lengths]
        img_feats = [self.embed_images(images[i : i + 1, : img_len[i]])[0] for i in range(n)]
        cap_feats = [
            self.embed_captions(captions[j : j + 1, : cap_len[j]], [cap_len[j]])[0] for j in range(len(cap_len))
        ]
        p = self.pooling_params()
        out = torch.zeros(n, len(cap_len), dtype=img_feats[0].dtype)
        for i, y in enumerate(img_feats):
            for j, x in enumerate(cap_feats):
                out[i, j] = pool_pair(self.pair_affinity(x, y), p.scale, p.slope, p.eps)
        return out

    def pair_affinity(self, caption_levels: Tensor, image_levels: Tensor) -> Tensor:
        """Word-region affinity ``(W, R)`` of one caption ``(W, Dt)`` and one image ``(R, Dt)``,
        level by level: ``sum_l X_l @ D_l @ Y_l^T``."""
        xs = self.text_levels.split(caption_levels)
        ys = self.image_levels.split(image_levels)
        return sum(
            (x @ d @ y.t() for x, d, y in zip(xs, self.correspondence.matrices(), ys)),
            torch.zeros((), dtype=caption_levels.dtype, device=caption_levels.device),
        )

    def _check_levels(self, t: Tensor, name: str) -> None:
        dt = self.config.total_dim
        if t.dim() != 3 or t.shape[-1] != dt:
            raise InputError(f"{name} must have shape (*, *, {dt}), got {tuple(t.shape)}")
