"""Caption-indexed dataset over a :class:`PrecompSplit`, its collate function and vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import EslmatchError, InputError
from ..text import WordVocab, tokenize
from .augment import PieceTokens, augment_caption_words, augment_pieces, drop_regions, word_pieces_of
from .precomp import PrecompSplit

if TYPE_CHECKING:
    from ..text import TextTokenizer


class CaptionItem(TypedDict):
    """One item of a :class:`CaptionDataset`."""

    image: Tensor
    ids: Tensor
    caption_index: int
    image_index: int


class CaptionDataset(Dataset):
    """One item per caption: the caption's token ids and its image's regions.

    Args:
        split: the opened split.
        tokenizer: a transformers tokenizer or a :class:`WordVocab`.
        train: apply region dropping and word masking (else the plain tokenisation, the
            same ids as :func:`eslmatch.text.tokenize`).
        seed: base seed; item ``i`` of epoch ``e`` draws from
            ``numpy.random.default_rng([seed, e, i])``.
        region_drop: probability of dropping each region (training only).
        word_mask: probability of augmenting each word (training only).

    Item ``i`` is a dict: ``image`` FloatTensor ``(R', D)`` (``R' <= R`` kept regions, at the
    front), ``ids`` LongTensor ``(W,)``, ``caption_index`` int, ``image_index`` int.
    """

    def __init__(
        self,
        split: PrecompSplit,
        tokenizer: TextTokenizer | None,
        train: bool,
        seed: int = 0,
        region_drop: float = 0.2,
        word_mask: float = 0.2,
    ) -> None:
        if tokenizer is None:
            raise EslmatchError("CaptionDataset needs a tokenizer (a transformers tokenizer or a WordVocab)")
        for name, p in (("region_drop", region_drop), ("word_mask", word_mask)):
            if not 0.0 <= p <= 1.0:
                raise EslmatchError(f"{name} must lie in [0, 1], got {p}")
        self.split = split
        self.tokenizer = tokenizer
        self.train = train
        self.seed = int(seed)
        self.region_drop = float(region_drop)
        self.word_mask = float(word_mask)
        self.epoch = 0
        # every caption's word pieces and the tokenizer's facts, made once (training only):
        # tokenising each caption again every epoch took most of a batch's loading time
        self._pieces: list[list[list[int]]] | None = None
        self._tokens: PieceTokens | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before each training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, i: int) -> CaptionItem:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"caption index {i} out of range for {len(self)} captions")
        img_index = self.split.image_of_caption(i)
        image = self.split.read_images(img_index)  # (R, D) float32 copy
        text = self.split.captions[i]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image = drop_regions(image, self.region_drop, rng)
            if isinstance(self.tokenizer, WordVocab):
                ids = augment_caption_words(self.tokenizer, text, self.word_mask, rng)
            else:
                if self._pieces is None or self._tokens is None:
                    self._pieces = word_pieces_of(self.tokenizer, self.split.captions)
                    self._tokens = PieceTokens.of(self.tokenizer)
                ids = augment_pieces(self._tokens, self._pieces[i], self.word_mask, rng)
        else:
            try:
                ids_t, lens = tokenize(self.tokenizer, [text])
            except InputError as exc:
                raise EslmatchError(f"{self.split.captions_path}: line {i + 1}: {exc}") from exc
            ids = ids_t[0, : int(lens[0])].tolist()
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "ids": torch.tensor(ids, dtype=torch.long),
            "caption_index": i,
            "image_index": img_index,
        }


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        images: ``(B, R_max, D)`` float, zero-padded after each image's length.
        image_lengths: ``(B,)`` long.
        captions: ``(B, W_max)`` long token ids, 0-padded.
        caption_lengths: ``(B,)`` long.
        image_index: ``(B,)`` long, image of each item in the split.
        caption_index: ``(B,)`` long, caption of each item in the split.
    """

    images: Tensor
    image_lengths: Tensor
    captions: Tensor
    caption_lengths: Tensor
    image_index: Tensor
    caption_index: Tensor

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate(items: Sequence[CaptionItem]) -> Batch:
    """Pad a list of :class:`CaptionDataset` items into a :class:`Batch`."""
    if not items:
        raise EslmatchError("cannot collate an empty batch")
    img_len = torch.tensor([int(it["image"].shape[0]) for it in items], dtype=torch.long)
    cap_len = torch.tensor([int(it["ids"].shape[0]) for it in items], dtype=torch.long)
    dim = int(items[0]["image"].shape[1])
    images = torch.zeros(len(items), int(img_len.max()), dim, dtype=torch.float32)
    captions = torch.zeros(len(items), int(cap_len.max()), dtype=torch.long)
    for b, it in enumerate(items):
        images[b, : img_len[b]] = it["image"]
        captions[b, : cap_len[b]] = it["ids"]
    return Batch(
        images=images,
        image_lengths=img_len,
        captions=captions,
        caption_lengths=cap_len,
        image_index=torch.tensor([int(it["image_index"]) for it in items], dtype=torch.long),
        caption_index=torch.tensor([int(it["caption_index"]) for it in items], dtype=torch.long),
    )


def build_vocab(split: PrecompSplit, min_count: int = 1) -> WordVocab:
    """Word vocabulary of the split's captions (for the GRU text encoder)."""
    return WordVocab.build(split.captions, min_count=min_count)
