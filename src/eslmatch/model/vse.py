"""VSE baseline: the ESL encoders, mean pooling, cosine similarity.

One global embedding per image (mean of its valid region embeddings) and per caption (mean
of its valid word embeddings), each l2-normalised; the score is their dot product. It shares
ESL's encoders, input checks and directory format (``config.json`` with
``"model_type": "vse"``), so training, evaluation and the CLI treat both alike.

:func:`build_model` is the factory that picks the class from ``config.model_type``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ESLConfig
from ..errors import EslmatchError, InputError
from ..scoring import DEFAULT_BUDGET_BYTES
from .encoders import RegionEncoder, build_text_encoder, lengths_to_mask
from .esl import ESLModel
from .functional import l2n


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x (N, L, D)`` over the positions where ``mask (N, L)`` is True -> ``(N, D)``."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class VSEModel(nn.Module):
    """Mean-pooled global embeddings with cosine similarity (``model_type="vse"``).

    Args:
        config: hyper-parameters; only the encoder settings (``embed_size``, ``img_dim``,
            ``text_encoder``, ...) are used.
        text_backbone: the transformers model of a ``"bert"`` text encoder.
        tokenizer: a transformers tokenizer or a :class:`~eslmatch.text.WordVocab`.
    """

    def __init__(self, config: ESLConfig, text_backbone: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        config.validate()
        if config.model_type != "vse":
            raise EslmatchError(f"VSEModel needs model_type 'vse', got {config.model_type!r}")
        self.config = config
        c = config
        self.image_encoder = RegionEncoder(c.img_dim, c.embed_size, c.l2_eps)
        self.text_encoder = build_text_encoder(c, text_backbone)
        self.tokenizer = tokenizer
        self.budget_bytes = DEFAULT_BUDGET_BYTES  # unused (no tiled scoring); kept for API parity

    # Construction, input checks and the directory format are ESL's, unchanged: they only
    # touch config, encoders, tokenizer and the state dict, which both classes share.
    from_config = classmethod(ESLModel.from_config.__func__)  # type: ignore[attr-defined]
    from_pretrained = classmethod(ESLModel.from_pretrained.__func__)  # type: ignore[attr-defined]
    save_pretrained = ESLModel.save_pretrained
    _check_images = ESLModel._check_images
    _check_captions = ESLModel._check_captions
    _vocab_size = ESLModel._vocab_size
    device = ESLModel.device

    # ------------------------------------------------------------------ public API
    encode_images = ESLModel.encode_images  # region embeddings (N, R, E)
    encode_captions = ESLModel.encode_captions  # word embeddings (M, W, E)

    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Global image embeddings ``(N, E)``: l2n of the mean of the valid region embeddings."""
        images, lengths = self._check_images(images, image_lengths)
        regions = self.image_encoder(images, lengths_to_mask(lengths, images.shape[1]))
        return l2n(masked_mean(regions, lengths_to_mask(lengths, images.shape[1])), eps=self.config.l2_eps)

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Global caption embeddings ``(M, E)``: l2n of the mean of the valid word embeddings."""
        captions, lengths = self._check_captions(captions, caption_lengths)
        words = self.text_encoder(captions, lengths)
        return l2n(masked_mean(words, lengths_to_mask(lengths, captions.shape[1])), eps=self.config.l2_eps)

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
    ) -> Tensor:
        """Cosine scores ``(N, M)`` of global embeddings ``(N, E)`` and ``(M, E)``.

        The lengths are accepted for API parity with :class:`ESLModel` and ignored: the
        embeddings are already pooled.
        """
        e = self.config.embed_size
        for name, t in (("image_emb", image_emb), ("caption_emb", caption_emb)):
            if t.dim() != 2 or t.shape[-1] != e:
                raise InputError(f"{name} must have shape (*, {e}), got {tuple(t.shape)}")
        return image_emb.to(self.device) @ caption_emb.to(self.device).t()

    def similarity(
        self,
        images: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        captions: Tensor,
        caption_lengths: Tensor | Sequence[int],
    ) -> Tensor:
        """Scores ``(n_images, n_captions)`` from region features and token ids."""
        return self.score(
            self.embed_images(images, image_lengths), None, self.embed_captions(captions, caption_lengths), None
        )

    forward = similarity

    tokenize = ESLModel.tokenize  # captions -> (ids (M, W), lengths (M,))

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per part of the model."""
        parts = {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts


def model_class(config: ESLConfig) -> type[nn.Module]:
    """The model class of ``config.model_type``."""
    return VSEModel if config.model_type == "vse" else ESLModel


def build_model(config: ESLConfig, tokenizer: Any = None) -> ESLModel | VSEModel:
    """New model of ``config.model_type`` (a ``"bert"`` encoder loads ``config.text_model``)."""
    return model_class(config).from_config(config, tokenizer)  # type: ignore[attr-defined]


def load_pretrained(directory: Any, map_location: str | torch.device = "cpu") -> ESLModel | VSEModel:
    """Load a directory written by ``save_pretrained`` as the class its config names."""
    import json
    from pathlib import Path

    from ..errors import CheckpointError
    from .esl import CONFIG_NAME

    path = Path(directory) / CONFIG_NAME
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type", "esl")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable model config ({exc})") from exc
    cls = VSEModel if model_type == "vse" else ESLModel
    return cls.from_pretrained(directory, map_location=map_location)
