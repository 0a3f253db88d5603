"""A model's identity: a fingerprint of its configuration and weights, the same wherever the
model lies (saved and reloaded, moved, copied) and different for any other model. Galleries
record it to refuse another model's vectors; ``embed`` keys its resumable parts on it."""

from __future__ import annotations

import hashlib
import json

import torch

from ..text import WordVocab
from .base import MatchingModel

_SAMPLES_PER_TENSOR = 1024  # values of each tensor a fingerprint reads
_IGNORED_CONFIG_KEYS = ("extra", "text_model")  # free-form, and where the text model lies


def model_fingerprint(model: MatchingModel) -> str:
    """A content fingerprint of a model: its configuration and a sample of every weight.

    The configuration (without free-form ``extra`` and the text model's *location*), the
    name, shape and dtype of every tensor of the state dict and up to 1,024 evenly spaced
    values of each (all values of small tensors) are hashed. It is the same for a model
    saved and reloaded, moved or copied, and differs for another training run or any
    changed layer. Costs a few milliseconds even for BERT-base.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if isinstance(model.tokenizer, WordVocab):  # a GRU model's vocabulary is part of it
        h.update(json.dumps(model.tokenizer.tokens).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue  # training bookkeeping, no effect on scores
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() > _SAMPLES_PER_TENSOR:
                idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
                flat = flat[idx]
            h.update(flat.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()
