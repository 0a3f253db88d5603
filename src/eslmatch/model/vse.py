"""VSE baseline: the ESL encoders, mean pooling, cosine similarity.

One global embedding per image (mean of its valid region embeddings) and per caption (mean
of its valid word embeddings), each l2-normalised; the score is their dot product. It shares
ESL's encoders, input checks and directory format (``config.json`` with
``"model_type": "vse"``) through :class:`~eslmatch.model.base.RegionTextModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError
from ..scoring import ScoringOptions
from ..utils import l2n, lengths_to_mask, masked_mean
from .base import RegionTextModel


class VSEModel(RegionTextModel):
    """Mean-pooled global embeddings with cosine similarity (``model_type="vse"``).

    Only the encoder settings of the config (``embed_size``, ``img_dim``, ``text_encoder``,
    ...) are used. Its score IS the inner product of its embeddings, so an index over them
    answers exactly.
    """

    family = "vse"
    exact_index = True

    def parts(self) -> dict[str, nn.Module]:
        return {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder}

    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Global image embeddings ``(N, E)``: l2n of the mean of the valid region embeddings."""
        images, lengths = self.check_images(images, image_lengths)
        regions = self.image_encoder(images, lengths_to_mask(lengths, images.shape[1]))
        return l2n(masked_mean(regions, lengths), eps=self.config.l2_eps)

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Global caption embeddings ``(M, E)``: l2n of the mean of the valid word embeddings."""
        captions, lengths = self.check_captions(captions, caption_lengths)
        return l2n(masked_mean(self.text_encoder(captions, lengths), lengths), eps=self.config.l2_eps)

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Cosine scores ``(N, M)`` of global embeddings ``(N, E)`` and ``(M, E)``.

        Lengths and options are accepted for the protocol and ignored: the embeddings are
        already pooled and one product needs no tiling.
        """
        e = self.config.embed_size
        for name, t in (("image_emb", image_emb), ("caption_emb", caption_emb)):
            if t.dim() != 2 or t.shape[-1] != e:
                raise InputError(f"{name} must have shape (*, {e}), got {tuple(t.shape)}")
        return image_emb.to(self.device) @ caption_emb.to(self.device).t()

    def index_vectors_images(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """The embeddings themselves: their inner product is the score."""
        return image_emb

    def index_vectors_captions(self, caption_emb: Tensor, caption_lengths: Tensor | Sequence[int] | None) -> Tensor:
        return caption_emb
