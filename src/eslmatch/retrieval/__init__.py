"""Gallery indexes and two-stage retrieval (see ``docs/retrieval.md``).

First stage: the exact bilinear global vectors (:meth:`ESLModel.global_images` /
:meth:`ESLModel.global_captions`, whose inner product is a pair's mean word-region
affinity) searched with FAISS. Second stage: full ESL scores of the ``rerank_k`` best.

- :func:`build_image_index`, :func:`build_caption_index`, :func:`add_to_index`,
  :func:`rebuild_faiss` write index directories atomically;
- :meth:`GalleryIndex.open` opens one (memory-mapped, checked);
- :meth:`GalleryIndex.search_text` (image index), :meth:`GalleryIndex.search_image`
  (caption index) return :class:`Hit` lists; :meth:`GalleryIndex.attention` gives the
  word-by-region attention of a pair for a heat-map.
"""

from __future__ import annotations

from .ann import FAISS_KINDS, FaissOptions
from .build import add_to_index, build_caption_index, build_image_index, rebuild_faiss
from .index import GalleryIndex, Hit, ImageEntry, plan_depth
from .sources import ImageSource
from .store import FORMAT, VERSION, GalleryIndexError, model_fingerprint

__all__ = [
    "FAISS_KINDS",
    "FORMAT",
    "VERSION",
    "FaissOptions",
    "GalleryIndex",
    "GalleryIndexError",
    "Hit",
    "ImageEntry",
    "ImageSource",
    "add_to_index",
    "build_caption_index",
    "build_image_index",
    "model_fingerprint",
    "plan_depth",
    "rebuild_faiss",
]
