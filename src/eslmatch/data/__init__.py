"""Data: precomp splits (memory-mapped regions + captions), augmentation, batching.

See ``docs/data.md``. The contract used by training and evaluation:

- :func:`open_split` -> :class:`PrecompSplit` (``.images`` memory-mapped ``(N_img, R, D)``,
  ``.captions``, ``.image_of_caption(c)``...);
- :class:`CaptionDataset` (one item per caption, augmentation when training) and
  :func:`collate` -> :class:`Batch`;
- :func:`build_vocab` for the GRU text encoder;
- :func:`encode_split` / :func:`length_batches` for evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

if TYPE_CHECKING:
    from .augment import augment_caption, choose_word_actions, drop_regions, word_pieces
    from .batching import encode_images, encode_split, eval_mode, iter_caption_features, length_batches, tokenize_split
    from .dataset import Batch, CaptionDataset, build_vocab, collate
    from .precomp import DATA_FOLDERS, SPLITS, PrecompSplit, find_precomp_folder, open_split
    from .sampler import EpochBatchSampler, epoch_order, steps_per_epoch

# imported on first use: ``eslmatch.data.files`` (listing a photo library) needs no torch
_WHERE = {
    **dict.fromkeys(("augment_caption", "choose_word_actions", "drop_regions", "word_pieces"), ".augment"),
    **dict.fromkeys(
        ("encode_images", "encode_split", "eval_mode", "iter_caption_features", "length_batches", "tokenize_split"),
        ".batching",
    ),
    **dict.fromkeys(("Batch", "CaptionDataset", "build_vocab", "collate"), ".dataset"),
    **dict.fromkeys(("DATA_FOLDERS", "SPLITS", "PrecompSplit", "find_precomp_folder", "open_split"), ".precomp"),
    **dict.fromkeys(("EpochBatchSampler", "epoch_order", "steps_per_epoch"), ".sampler"),
}
__getattr__ = lazy_attributes(__name__, _WHERE)

__all__ = [
    "DATA_FOLDERS",
    "SPLITS",
    "Batch",
    "CaptionDataset",
    "PrecompSplit",
    "augment_caption",
    "build_vocab",
    "choose_word_actions",
    "collate",
    "drop_regions",
    "encode_images",
    "encode_split",
    "find_precomp_folder",
    "iter_caption_features",
    "length_batches",
    "open_split",
    "tokenize_split",
    "word_pieces",
    "EpochBatchSampler",
    "epoch_order",
    "eval_mode",
    "steps_per_epoch",
]
