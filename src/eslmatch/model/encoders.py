"""Image region and text encoders (spec section 1).

- :class:`RegionEncoder`: ``l2n(fc(V) + mlp(V))`` over precomputed region features.
- :class:`BertTextEncoder`: any BERT-family model from transformers, then a linear map.
- :class:`GRUTextEncoder`: word embeddings and a one-layer bidirectional GRU whose two
  directions are averaged (the VSE-infinity BiGRU setting), for users without BERT.

All take explicit lengths: padded regions never enter BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..distributed import all_reduce_with_grad, world_size
from ..errors import CheckpointError, EslmatchError
from ..text import resolve_text_model
from ..utils import l2n
from ..utils.precision import autocast_active

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from transformers import PretrainedConfig

    from ..config import ESLConfig
from .bert import BertSettings, PlainBert, key_mask, read_bert_config, supports


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the valid rows of ``(N, R, C)`` only (in training).

    In eval mode it uses running statistics row by row, so padding never matters.

    Distributed training sets ``synchronize = True`` and ``process_group`` on each instance
    (:func:`enable_sync_batchnorm`): training statistics are then taken
    over the valid rows of every rank, summed with an autograd-aware all-reduce, so N ranks
    with B images each normalise (and back-propagate) exactly as one rank with N*B images.
    """

    synchronize: bool = False
    process_group: ProcessGroup | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.training and self.synchronize and world_size(self.process_group) > 1:
            return self._synced_forward(flat, None if mask is None else mask.reshape(-1)).reshape(shape)
        if mask is None or not self.training:
            return super().forward(flat).reshape(shape)
        m = mask.reshape(-1)
        out = torch.zeros_like(flat)
        out = out.index_put((m.nonzero(as_tuple=True)[0],), super().forward(flat[m]))
        return out.reshape(shape)

    def _synced_forward(self, flat: Tensor, mask: Tensor | None) -> Tensor:
        """Training BatchNorm of ``flat (N*R, C)`` with statistics over every rank's valid rows."""
        all_reduce = all_reduce_with_grad
        group = self.process_group
        rows = flat if mask is None else flat[mask]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 statistics in fp32
        c = rows.shape[1]
        # One all-reduce for the sums and the row count, a second (two-pass) for the
        # centred squares: as accurate as the single-process BatchNorm.
        count = torch.full((1,), float(rows.shape[0]), dtype=rows.dtype, device=rows.device)
        totals = all_reduce(torch.cat([rows.sum(0), count]), group=group)
        n = totals[c].detach()
        if float(n) < 2:
            raise ValueError(f"BatchNorm needs more than one valid row in training, got {int(n)} over all ranks")
        mean = totals[:c] / n
        centred = rows - mean
        var = all_reduce((centred * centred).sum(0), group=group) / n
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
                else:
                    factor = self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = out.to(flat.dtype)
        if mask is None:
            return out
        full = torch.zeros_like(flat)
        return full.index_put((mask.nonzero(as_tuple=True)[0],), out)


def enable_sync_batchnorm(model: nn.Module, group: ProcessGroup | None, distributed: bool) -> int:
    """Make every :class:`MaskedBatchNorm1d` of ``model`` take its training statistics over
    all ranks of ``group`` (when ``distributed``). Returns how many were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, MaskedBatchNorm1d):
            m.synchronize = distributed
            m.process_group = group
            n += 1
    return n


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
    With ``frozen=True`` the backbone gets no gradient, stays in eval mode, and its hidden
    states are cached per distinct caption (captions repeat across epochs), so training only
    pays for the projection and the rest of ESL. With ``train_layers=k`` (a BERT-like model
    with ``embeddings`` and ``encoder.layer``) only the top ``k`` transformer layers train:
    the embeddings and the layers below are frozen the same way (eval mode, their output
    cached per caption), and each step runs just the top ``k`` layers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_size: int,
        eps: float = 1e-8,
        frozen: bool = False,
        train_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone: Any = backbone  # a transformers model
        hidden = int(cast(Any, backbone).config.hidden_size)
        self.proj = nn.Linear(hidden, embed_size)
        self.eps = eps
        n_layers = _layer_count(backbone) if train_layers is not None and not frozen else None
        if train_layers is not None and train_layers < 0:
            raise EslmatchError(f"text_train_layers must be >= 0, got {train_layers}")
        if frozen or train_layers == 0:
            self.split: int | None = None  # everything frozen
        elif train_layers is None or n_layers is None or train_layers >= n_layers:
            self.split = 0  # everything trains
        else:
            self.split = n_layers - train_layers  # layers below this index are frozen
        self.frozen = self.split is None
        # keyed on first use (hashing the frozen weights takes a while; a search never needs it)
        self._caches: dict[str, dict[tuple[int, ...], Tensor]] = {}
        self._uncached = False
        frozen_params = self._frozen_parameters()
        for p in frozen_params:
            p.requires_grad_(False)
        if frozen_params:
            self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_cache())
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.split is None:
            return [self.backbone]
        if self.split == 0:
            return []
        return [self.backbone.embeddings, *list(self.backbone.encoder.layer)[: self.split]]

    def _frozen_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._frozen_modules() for p in m.parameters()]

    def _frozen_names(self) -> tuple[str, ...] | None:
        """State-dict prefixes of the frozen part (``None``: the whole backbone)."""
        if self.split is None:
            return None
        return ("embeddings.", *(f"encoder.layer.{i}." for i in range(self.split)))

    def train(self, mode: bool = True) -> BertTextEncoder:
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def refresh_cache(self) -> None:
        """Re-key the hidden-state cache (on its next use) after the backbone's weights were replaced."""
        self._caches = {}

    def _cache_now(self, variant: str) -> dict[tuple[int, ...], Tensor]:
        """The cache of ``variant``: hidden states computed under bf16 autocast (``bf16``) are
        kept apart from float32 ones (an fp32 evaluation never reads bf16 values)."""
        if variant not in self._caches:
            self._caches[variant] = _shared_cache(self.backbone, self._frozen_names(), self.split, variant)
        return self._caches[variant]

    def _hidden(self, ids: Tensor) -> Tensor:
        attention = (ids != 0).to(torch.long)
        return self.backbone(input_ids=ids, attention_mask=attention)[0]

    def _lower(self, ids: Tensor) -> Tensor:
        """The frozen part's output: the last hidden state, or the input of layer ``split``."""
        if self.split is None:
            return self._hidden(ids)
        # the embeddings and the layers below ``split`` only (the top ones would be thrown away)
        hidden = self.backbone.embeddings(input_ids=ids)
        return self._layers(hidden, ids, 0, self.split)

    def _upper(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """The trainable top layers on the cached ``(M, W, H)`` input of layer ``split``.

        Rows run in groups of similar length, each trimmed to its longest caption: attention
        masks padding, so a real position does not depend on the width, and short captions
        padded to the longest of a batch of 64 waste ~40% of the layers' work. Positions past
        a caption's length hold no meaning in the output (zeros past its group's width).
        """
        top = len(self.backbone.encoder.layer)
        lengths = (ids != 0).sum(1)
        groups = length_groups(lengths, _GROUP_ROWS)
        if len(groups) == 1:
            return self._layers(hidden, ids, cast(int, self.split), top)
        width = ids.shape[1]
        parts = []
        for rows in groups:
            w = max(int(lengths[rows].max()), 1)
            part = self._layers(hidden[rows, :w], ids[rows, :w], cast(int, self.split), top)
            parts.append(nn.functional.pad(part, (0, 0, 0, width - w)))
        return torch.cat(parts)[torch.argsort(torch.cat(groups))]

    def _layers(self, hidden: Tensor, ids: Tensor, first: int, stop: int) -> Tensor:
        """Transformer layers ``first..stop-1`` on ``(M, W, H)`` hidden states of ``ids``."""
        attention = (ids != 0).to(torch.long)
        if isinstance(self.backbone, PlainBert):
            mask = key_mask(attention, hidden.dtype)
        else:
            from transformers.masking_utils import create_bidirectional_mask

            mask = create_bidirectional_mask(
                config=self.backbone.config, inputs_embeds=hidden, attention_mask=attention
            )
        for layer in list(self.backbone.encoder.layer)[first:stop]:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _cached_hidden(self, ids: Tensor) -> Tensor:
        cache = self._cache_now("bf16" if autocast_active(ids.device.type) else "fp32")
        lengths = (ids != 0).sum(1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(ids.tolist(), lengths)]
        todo = sorted({k for k in keys if k not in cache}, key=len)
        fresh: dict[tuple[int, ...], Tensor] = {}
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            width = max(len(k) for k in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long, device=ids.device)
            for i, k in enumerate(chunk):
                batch[i, : len(k)] = torch.tensor(k, device=ids.device)
            with torch.no_grad():
                hidden = self._lower(batch)
            for i, k in enumerate(chunk):
                fresh[k] = hidden[i, : len(k)].clone()
        _remember(cache, fresh)
        out = torch.zeros(ids.shape[0], ids.shape[1], int(self.backbone.config.hidden_size), device=ids.device)
        for i, k in enumerate(keys):
            out[i, : len(k)] = (fresh[k] if k in fresh else cache[k]).to(ids.device)
        return out

    @contextlib.contextmanager
    def uncached(self) -> Iterator[None]:
        """Run the whole backbone on every call inside the block: no hidden-state cache, no
        length groups (the same values at every real position), so the encoder can be traced
        (ONNX export)."""
        self._uncached = True
        try:
            yield
        finally:
            self._uncached = False

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        if self.split == 0 or self._uncached:
            hidden = self._hidden(ids)
        else:
            hidden = self._cached_hidden(ids)
            if self.split is not None:
                hidden = self._upper(hidden, ids)
        return l2n(self.proj(hidden), eps=self.eps)


# Rows per length group of the trainable top layers (at least; see length_groups).
_GROUP_ROWS = 16


def length_groups(lengths: Tensor, rows: int) -> list[Tensor]:
    """Row indices of a batch ``(n,)`` sorted by length, cut into groups of ``>= rows`` rows.

    A batch of fewer than ``2 * rows`` rows is one group.
    """
    order = torch.argsort(lengths, stable=True)
    return list(torch.tensor_split(order, max(1, len(order) // rows)))


def _layer_count(backbone: nn.Module) -> int:
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if getattr(backbone, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        raise EslmatchError(
            f"text_train_layers needs a BERT-like model (embeddings + encoder.layer); {type(backbone).__name__} is not"
        )
    return len(layers)


# At most this many bytes of cached hidden states per process (beyond it captions are
# encoded each time they are seen): a bound for very large caption sets.
CACHE_BYTES = 4 << 30
_SHARED_CACHES: dict[str, dict[tuple[int, ...], Tensor]] = {}
_CACHE_SIZES: dict[int, int] = {}


def _remember(cache: dict[tuple[int, ...], Tensor], fresh: dict[tuple[int, ...], Tensor]) -> None:
    used = _CACHE_SIZES.get(id(cache), 0)
    for k, v in fresh.items():
        size = v.numel() * v.element_size()
        if used + size > CACHE_BYTES:
            break
        cache[k] = v
        used += size
    _CACHE_SIZES[id(cache)] = used


def _shared_cache(
    backbone: nn.Module, prefixes: tuple[str, ...] | None = None, split: int | None = None, precision: str = "fp32"
) -> dict[tuple[int, ...], Tensor]:
    """One hidden-state cache per distinct frozen part of a backbone in this process.

    Keyed by the frozen part's content (every tensor's name, shape, dtype and bytes, only
    names under ``prefixes`` when given), ``split`` and the ``precision`` the states are
    computed in, so two models built from the same frozen weights (say ESL and its VSE
    baseline) encode each caption once. Weights loaded later (``load_state_dict``) must call
    :meth:`BertTextEncoder.refresh_cache`.
    """
    digest = hashlib.sha256(f"split={split}".encode() + (b"" if precision == "fp32" else f";{precision}".encode()))
    with torch.no_grad():
        for name, t in backbone.state_dict().items():
            if prefixes is None or name.startswith(prefixes):
                digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                digest.update(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return _SHARED_CACHES.setdefault(digest.hexdigest(), {})


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


def build_text_encoder(config: ESLConfig, text_backbone: nn.Module | None) -> nn.Module:
    """The text encoder an :class:`~eslmatch.config.ESLConfig` asks for (ESL and VSE alike)."""
    c = config
    if c.text_encoder == "bert":
        if text_backbone is None:
            raise EslmatchError("a BERT text encoder needs its transformers model")
        return BertTextEncoder(text_backbone, c.embed_size, c.l2_eps, c.freeze_text_backbone, c.text_train_layers)
    if not c.vocab_size:
        raise EslmatchError("the GRU text encoder needs vocab_size")
    return GRUTextEncoder(c.vocab_size, c.word_dim, c.embed_size, c.l2_eps)


# ---------------------------------------------------------------------- BERT construction
def _no_pooler_kwargs(config: PretrainedConfig) -> dict[str, Any]:  # **kwargs for transformers
    # The pooler is never used for word features; BERT-like classes take this flag.
    return {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta"} else {}


def bert_from_config(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised transformers model for ``config`` (eager attention)."""
    from transformers import AutoModel  # heavy: only when a BERT model is built

    config._attn_implementation = "eager"
    return AutoModel.from_config(config, **_no_pooler_kwargs(config))


def text_backbone_for_loading(directory: Path) -> nn.Module:
    """The untrained BERT of a saved model's text folder, to receive its saved weights: a
    :class:`~eslmatch.model.bert.PlainBert` for the plain BERT architecture (no transformers
    import), transformers' model for any other."""
    try:
        data = read_bert_config(directory)
        if supports(data):
            return PlainBert(BertSettings(data))
        from transformers import AutoConfig  # heavy: only for text models PlainBert does not build

        return bert_from_config(AutoConfig.from_pretrained(str(directory)))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory}: unreadable text encoder config ({exc})") from exc


def bert_from_pretrained(name_or_path: str | Path) -> nn.Module:
    """Load a BERT-family model from a local directory or a Hub name (cache or network)."""
    from transformers import AutoConfig, AutoModel  # heavy: only when a BERT model is built
    from transformers.utils import logging as hf_logging

    source, local_only = resolve_text_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        config._attn_implementation = "eager"
        # The unused pooler weights are reported as UNEXPECTED: expected here, so keep quiet.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return AutoModel.from_pretrained(
                source, config=config, local_files_only=local_only, **_no_pooler_kwargs(config)
            )
        finally:
            hf_logging.set_verbosity(level)
            hf_logging.enable_progress_bar()
    except OSError as exc:
        raise EslmatchError(
            f"cannot load text model {str(name_or_path)!r}: {str(exc).splitlines()[0]} "
            "(give a local model folder, model.text_model=minilm, or a Hub name that is cached or reachable)"
        ) from exc
