"""Encoding gallery items and queries into what the index stores and searches.

Two-stage (ESL). Images: region features ``(B, R, D)`` -> engine-ready image side
``(B, R, Dt)`` (:meth:`ESLModel.prepare_images` of the level features) and the first-stage
vector ``(B, Dt)`` (its mean over real regions, as :meth:`ESLModel.index_vectors_images`).
Captions: text -> level features ``(B, W, Dt)`` and their mean over real words
(:meth:`ESLModel.index_vectors_captions`). The inner product of the two vectors is the pair's
mean word-region affinity.

One-stage (``exact_index``: VSE, ESL-CLIP): :func:`image_vectors` / :func:`caption_vectors`
give ``index_vectors_images(embed_images(...))`` / ``index_vectors_captions(embed_captions(...))``,
whose inner product IS the model's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import EslmatchError
from ..text import WordVocab, pad_ids, tokenize_each, words
from ..utils import masked_mean


def require_two_stage(model: Any) -> None:
    """Refuse models an index cannot serve: a two-stage index needs ESL's re-rank
    (``score_prepared``) over region features; single-vector models (``exact_index``) get a
    one-stage index."""
    if is_one_stage(model):
        return
    kind = model_kind(model)
    if not hasattr(model, "score_prepared"):
        raise EslmatchError(f"gallery indexes need an ESL model or a single-vector model; this one is {kind}")
    if takes_pixels(model):
        raise EslmatchError(
            f"two-stage gallery indexes need a model of region features; this one ({kind}) takes pixels"
        )


def model_kind(model: Any) -> str:
    """The model's ``model_type`` (its class name when it has none), for messages."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def is_one_stage(model: Any) -> bool:
    """True for models whose index vectors' inner product IS the score (VSE, ESL-CLIP): their
    index is one-stage and exact, it stores one vector per item and nothing else."""
    return bool(getattr(model, "exact_index", False))


def takes_pixels(model: Any) -> bool:
    """True for models that embed preprocessed pixels (they have ``preprocess``)."""
    return hasattr(model, "preprocess")


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """``x (B, T, D)`` with positions at or beyond ``lengths[b]`` set to 0."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x * mask[..., None].to(x.dtype)


def image_vectors(model: Any, images: np.ndarray | Tensor, lengths: np.ndarray | Tensor | None = None) -> Tensor:
    """One-stage index vectors ``(B, K)`` of images: region features ``(B, R, D)`` (with their
    lengths) or preprocessed pixels ``(B, 3, H, W)`` for a model that takes pixels; one
    image without its batch dimension is accepted. Call inside ``eval_mode(model)``."""
    x = torch.as_tensor(images, dtype=torch.float32).to(model.device)
    if x.dim() == (3 if takes_pixels(model) else 2):  # one image
        x = x[None]
    lens = None
    if lengths is not None and not takes_pixels(model):
        lens = torch.as_tensor(lengths).long().reshape(-1).to(model.device)
    return model.index_vectors_images(model.embed_images(x, lens), lens)


def caption_vectors(model: Any, ids: Sequence[Tensor]) -> Tensor:
    """One-stage index vectors ``(B, K)`` of token id lists. Call inside ``eval_mode(model)``."""
    tokens, lens = pad_ids([t.tolist() for t in ids])
    tokens, lens = tokens.to(model.device), lens.to(model.device)
    return model.index_vectors_captions(model.embed_captions(tokens, lens), lens)


def encode_images(
    model: Any, regions: np.ndarray | Tensor, lengths: np.ndarray | Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Region features ``(B, R, D)`` -> ``(image side (B, R, Dt), global (B, Dt), lengths (B,))``.

    Call inside ``eval_mode(model)``; padded regions of the side are zeroed. (A one-stage
    model gives ``(vectors (B, 1, K), vectors (B, K), ones)``: see :func:`image_vectors`.)
    """
    if is_one_stage(model):
        vec = image_vectors(model, regions, lengths)
        return vec[:, None, :], vec, torch.ones(vec.shape[0], dtype=torch.long, device=vec.device)
    dev = model.device
    x = torch.as_tensor(regions, dtype=torch.float32).to(dev)
    if x.dim() == 2:
        x = x[None]
    n, r = x.shape[0], x.shape[1]
    lens = torch.full((n,), r, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().reshape(-1)
    lens = lens.to(dev)
    side = zero_padding(model.prepare_images(model.embed_images(x, lens)), lens)
    return side, masked_mean(side, lens), lens


def tokenize_all(model: Any, captions: Sequence[str], where: str = "caption") -> list[Tensor]:
    """Token ids of every caption: a list of ``(W_c,)`` LongTensors (errors name the caption)."""
    return tokenize_each(model.tokenize, captions, lambda i: f"{where} {i}")


def encode_token_batch(model: Any, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Token id lists -> ``(level features (B, W, Dt), global (B, Dt), lengths (B,))``.

    Call inside ``eval_mode(model)``. (A one-stage model gives ``(vectors (B, 1, K), vectors
    (B, K), ones)``: see :func:`caption_vectors`.)
    """
    if is_one_stage(model):
        vec = caption_vectors(model, ids)
        return vec[:, None, :], vec, torch.ones(vec.shape[0], dtype=torch.long, device=vec.device)
    tokens, lens = pad_ids([t.tolist() for t in ids])
    dev = model.device
    tokens, lens = tokens.to(dev), lens.to(dev)
    feats = zero_padding(model.embed_captions(tokens, lens), lens)
    return feats, masked_mean(feats, lens), lens


def caption_words(model: Any, text: str, ids: Tensor) -> list[str]:
    """A display string for each token of ``text`` (``ids (W,)`` from ``model.tokenize``)."""
    tok = model.tokenizer
    if isinstance(tok, WordVocab):
        shown = ["<start>", *words(text), "<end>"]
        if len(shown) == ids.numel():
            return shown
        return [tok.tokens[i] for i in ids.tolist()]
    convert = getattr(tok, "convert_ids_to_tokens", None)
    if convert is not None:
        return [str(t) for t in convert(ids.tolist())]
    return [str(i) for i in ids.tolist()]
