"""Image region and text encoders (spec section 1).

- :class:`RegionEncoder`: ``l2n(fc(V) + mlp(V))`` over precomputed region features.
- :class:`BertTextEncoder`: any BERT-family model from transformers, then a linear map.
- :class:`GRUTextEncoder`: word embeddings and a one-layer bidirectional GRU whose two
  directions are averaged (the VSE-infinity BiGRU setting), for users without BERT.

All take explicit lengths: padded regions never enter BatchNorm statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import EslmatchError
from .functional import l2n


def lengths_to_mask(lengths: Tensor, width: int) -> Tensor:
    """``(N,)`` lengths -> bool ``(N, width)`` mask, True for positions < length."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the valid rows of ``(N, R, C)`` only (in training).

    In eval mode it uses running statistics row by row, so padding never matters.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if mask is None or not self.training:
            return super().forward(flat).reshape(shape)
        m = mask.reshape(-1)
        out = torch.zeros_like(flat)
        out = out.index_put((m.nonzero(as_tuple=True)[0],), super().forward(flat[m]))
        return out.reshape(shape)


class RegionMLP(nn.Module):
    """Linear(D, E/2) -> BatchNorm1d(E/2) -> ReLU -> Linear(E/2, E)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = MaskedBatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x), mask)))


class RegionEncoder(nn.Module):
    """Precomputed region features ``(N, R, D_in)`` -> region embeddings ``(N, R, E)``."""

    def __init__(self, img_dim: int, embed_size: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = RegionMLP(img_dim, embed_size // 2, embed_size)
        self.eps = eps
        r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # Xavier, as the released code
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        return l2n(self.fc(images) + self.mlp(images, mask), eps=self.eps)


class BertTextEncoder(nn.Module):
    """Token ids ``(M, W)`` (0 = padding) -> word embeddings ``(M, W, E)``.

    ``backbone`` is a transformers model whose first output is the last hidden state.
    """

    def __init__(self, backbone: nn.Module, embed_size: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.proj = nn.Linear(hidden, embed_size)
        self.eps = eps

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        attention = (ids != 0).to(torch.long)
        hidden = self.backbone(input_ids=ids, attention_mask=attention)[0]
        return l2n(self.proj(hidden), eps=self.eps)


class GRUTextEncoder(nn.Module):
    """Word ids ``(M, W)`` -> ``(M, W, E)``: embeddings, one-layer BiGRU, directions averaged."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers=1, batch_first=True, bidirectional=True)
        self.embed_size = embed_size
        self.eps = eps
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        x = self.embed(ids)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        out = (out[..., : self.embed_size] + out[..., self.embed_size :]) / 2
        return l2n(out, eps=self.eps)


# ---------------------------------------------------------------------- BERT construction
def _no_pooler_kwargs(config: Any) -> dict[str, Any]:
    # The pooler is never used for word features; BERT-like classes take this flag.
    return {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta"} else {}


def bert_from_config(config: Any) -> nn.Module:
    """A randomly initialised transformers model for ``config`` (eager attention)."""
    from transformers import AutoModel

    config._attn_implementation = "eager"
    return AutoModel.from_config(config, **_no_pooler_kwargs(config))


def bert_from_pretrained(name_or_path: str | Path) -> nn.Module:
    """Load a BERT-family model from a local directory or a Hub name (cache or network)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
        config._attn_implementation = "eager"
        return AutoModel.from_pretrained(str(name_or_path), config=config, **_no_pooler_kwargs(config))
    except OSError as exc:
        raise EslmatchError(
            f"cannot load text model {str(name_or_path)!r}: {str(exc).splitlines()[0]} "
            "(give a local model directory, or a Hub name that is cached or reachable)"
        ) from exc
