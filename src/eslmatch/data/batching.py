"""Encoding a whole split for evaluation: images in order, captions in length buckets.

Captions are tokenised once with the model's own tokenizer (:meth:`ESLModel.tokenize`), sorted
by token count and encoded in batches of similar length (so padding costs little), then
scattered back to their original order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..errors import EslmatchError
from ..text import pad_ids, tokenize_each
from ..utils import resolve_device
from .precomp import PrecompSplit

if TYPE_CHECKING:
    from ..model.base import MatchingModel

T = TypeVar("T")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int] | np.ndarray | Tensor, batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first, ties in index order) cut into batches.

    Returns:
        a list of int64 arrays, each at most ``batch_size`` long, covering every index once.
    """
    if batch_size < 1:
        raise EslmatchError(f"batch size must be >= 1, got {batch_size}")
    lens = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(iterable: Iterable[T], progress: bool, desc: str, total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only, so logs and pipes stay clean.
    return tqdm(iterable, desc=desc, total=total, disable=None if progress else True, leave=False)


def tokenize_split(model: MatchingModel, split: PrecompSplit) -> list[Tensor]:
    """Token ids of every caption with ``model.tokenize``: a list of ``(W_c,)`` LongTensors."""
    return tokenize_each(model.tokenize, split.captions, lambda i: f"{split.captions_path}: line {i + 1}")


def encode_images(
    model: MatchingModel,
    split: PrecompSplit,
    batch_size: int = 128,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Image level features of the whole split, in order.

    Returns:
        ``(features (N, R, Dt), lengths (N,))`` on ``device``; every region is real.
    """
    device = resolve_device(device, model)
    n, r = split.n_images, split.n_regions
    feats: Tensor | None = None
    with eval_mode(model):
        for i0 in _progress(range(0, n, batch_size), progress, f"images {split.name}"):
            i1 = min(i0 + batch_size, n)
            x = torch.from_numpy(split.read_images(slice(i0, i1))).to(device)
            y = model.embed_images(x, None)
            if feats is None:
                feats = y.new_empty(n, *y.shape[1:])
            feats[i0:i1] = y
    assert feats is not None
    return feats, torch.full((n,), r, dtype=torch.long, device=device)


def iter_caption_features(
    model: MatchingModel,
    split: PrecompSplit,
    batch_size: int = 128,
    device: torch.device | None = None,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
    """Encode captions in length buckets, longest first.

    Yields:
        ``(caption indices (B,), features (B, W, Dt), lengths (B,))`` per batch.
    """
    device = resolve_device(device, model)
    ids = tokenize_split(model, split)
    lengths = [int(t.numel()) for t in ids]
    batches = length_batches(lengths, batch_size)
    with eval_mode(model):
        for idx in _progress(batches, progress, f"captions {split.name}", total=len(batches)):
            tokens, lens = pad_ids([ids[int(c)] for c in idx])
            yield idx, model.embed_captions(tokens.to(device), lens.to(device)), lens.to(device)


def encode_split(
    model: MatchingModel,
    split: PrecompSplit,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = True,
    storage_device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level features of every image and caption of ``split`` (eval mode, no autograd).

    Args:
        model: an :class:`~eslmatch.ESLModel`; moved to ``device`` when that is given.
        device: where to compute (``None``: the model's device; ``"auto"``: CUDA if any).
        storage_device: where to keep the results (default: the compute device).
    Returns:
        ``(image_feats (N, R, Dt), image_lengths (N,), caption_feats (M, W_max, Dt),
        caption_lengths (M,))``, captions in the split's order, zero-padded.
    """
    dev = resolve_device(device, model)
    model.to(dev)
    store = dev if storage_device is None else resolve_device(storage_device)
    img, img_len = encode_images(model, split, batch_size, dev, progress)
    img, img_len = img.to(store), img_len.to(store)
    m = split.n_captions
    cap: Tensor | None = None
    cap_len = torch.zeros(m, dtype=torch.long, device=store)
    for idx, feats, lens in iter_caption_features(model, split, batch_size, dev, progress):
        if cap is None:  # the first batch holds the longest captions
            cap = feats.new_zeros((m, feats.shape[1], feats.shape[2]), device=store)
        where = torch.from_numpy(idx).to(store)
        cap[where, : feats.shape[1]] = feats.to(store)
        cap_len[where] = lens.to(store)
    assert cap is not None
    return img, img_len, cap, cap_len
