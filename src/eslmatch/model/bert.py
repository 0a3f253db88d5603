"""BERT's encoder in plain PyTorch: a saved model's text side without importing transformers.

Importing transformers and building its ``BertModel`` costs about 1.3 s of every process that
loads a BERT-based ESL or VSE model (``eslmatch search`` answers in 3 s, 70 ms of it the
search). A saved model already holds the BERT config (``text/config.json``) and every weight,
so for the plain BERT architecture (absolute positions, GELU or ReLU, no decoder parts) this
module builds the same modules under the same state-dict names and computes the same values,
operation for operation as transformers' eager attention does (tests/model/test_bert.py
compares the two in float32 and under bf16 autocast). Other text models are built by
transformers as before (:func:`supports`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CONFIG_FILE = "config.json"
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def read_bert_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a BERT folder as a dict (``OSError`` / ``ValueError`` when unreadable)."""
    data = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_FILE} is not a JSON object")
    return data


def supports(config: dict[str, Any]) -> bool:
    """Whether ``config`` (a transformers config as a dict) is the architecture built here."""
    return (
        config.get("model_type") == "bert"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and config.get("hidden_act", "gelu") in _ACTIVATIONS
        and not config.get("is_decoder", False)
        and not config.get("add_cross_attention", False)
        and config.get("chunk_size_feed_forward", 0) == 0
        and config.get("embedding_size") in (None, config.get("hidden_size"))
        and all(isinstance(config.get(k), int) for k in _REQUIRED)
    )


class BertSettings:
    """The transformers config of a BERT folder: its values as attributes, written back as read."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = dict(data)
        self.model_type = "bert"
        self.hidden_size = int(data["hidden_size"])
        self.num_attention_heads = int(data["num_attention_heads"])
        self.num_hidden_layers = int(data["num_hidden_layers"])
        self.intermediate_size = int(data["intermediate_size"])
        self.vocab_size = int(data["vocab_size"])
        self.max_position_embeddings = int(data.get("max_position_embeddings", 512))
        self.type_vocab_size = int(data.get("type_vocab_size", 2))
        self.pad_token_id = data.get("pad_token_id", 0)
        self.layer_norm_eps = float(data.get("layer_norm_eps", 1e-12))
        self.hidden_dropout_prob = float(data.get("hidden_dropout_prob", 0.1))
        self.attention_probs_dropout_prob = float(data.get("attention_probs_dropout_prob", 0.1))
        self.hidden_act = str(data.get("hidden_act", "gelu"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` into ``directory`` (as transformers' configs do)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self._data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class BertEmbeddings(nn.Module):
    """Token ids ``(B, W)`` -> ``(B, W, H)``: word + token type 0 + position, LayerNorm, dropout."""

    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab_size, s.hidden_size, padding_idx=s.pad_token_id)
        self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.hidden_size)
        self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout_prob)

    def forward(self, input_ids: Tensor) -> Tensor:
        width = input_ids.shape[1]
        positions = torch.arange(width, device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(positions))
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.head_size = s.hidden_size // s.num_attention_heads
        self.scaling = self.head_size**-0.5
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(s.hidden_size, s.hidden_size)
        self.value = nn.Linear(s.hidden_size, s.hidden_size)
        self.dropout = nn.Dropout(s.attention_probs_dropout_prob)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """``(B, W, H)`` with an additive ``(B, 1, 1, W)`` key mask (or ``None``) -> ``(B, W, H)``."""
        shape = (*hidden.shape[:-1], -1, self.head_size)
        q = self.query(hidden).view(shape).transpose(1, 2)
        k = self.key(hidden).view(shape).transpose(1, 2)
        v = self.value(hidden).view(shape).transpose(1, 2)
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if mask is not None:
            weights = weights + mask
        weights = self.dropout(F.softmax(weights, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return out.reshape(*hidden.shape[:-1], -1).contiguous()


class BertSelfOutput(nn.Module):
    """Dense, dropout, LayerNorm of the sum with the block's input (after attention and the FFN)."""

    def __init__(self, s: BertSettings, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.self = BertSelfAttention(s)
        self.output = BertSelfOutput(s, s.hidden_size)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(hidden, mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.intermediate_size)
        self.act = _ACTIVATIONS[s.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One transformer block: ``(B, W, H)`` and a key mask -> ``(B, W, H)``."""

    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.attention = BertAttention(s)
        self.intermediate = BertIntermediate(s)
        self.output = BertSelfOutput(s, s.intermediate_size)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


class BertLayers(nn.Module):
    def __init__(self, s: BertSettings) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(s) for _ in range(s.num_hidden_layers))


class PlainBert(nn.Module):
    """transformers' ``BertModel`` without its pooler: ``input_ids (B, W)`` -> ``((B, W, H),)``.

    Module and parameter names are transformers' (``embeddings.word_embeddings.weight``,
    ``encoder.layer.0.attention.self.query.weight``, ...), so the state dicts are the same.
    """

    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.config = settings
        self.embeddings = BertEmbeddings(settings)
        self.encoder = BertLayers(settings)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor]:
        hidden = self.embeddings(input_ids)
        mask = key_mask(attention_mask, hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
        return (hidden,)


def key_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(B, W)`` 1 = real, 0 = padding -> an additive ``(B, 1, 1, W)`` mask (0 or the dtype's
    minimum) as transformers' eager attention adds it; ``None`` without padding, as there
    (except while tracing for ONNX, where the graph must keep the mask for padded batches)."""
    if attention_mask is None or (not torch.jit.is_tracing() and bool(attention_mask.all())):
        return None
    blocked = (attention_mask == 0)[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )
