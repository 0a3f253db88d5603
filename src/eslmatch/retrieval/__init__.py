"""Gallery indexes: two-stage retrieval for ESL, one-stage exact search for single-vector
models (see ``docs/retrieval.md``).

Two-stage (ESL). First stage: the exact bilinear global vectors (:meth:`ESLModel.global_images`
/ :meth:`ESLModel.global_captions`, whose inner product is a pair's mean word-region
affinity) searched with FAISS. Second stage: full ESL scores of the ``rerank_k`` best.

One-stage (``model.exact_index``: VSE, ESL-CLIP). The index holds only the model's index
vectors, whose inner product IS its score: FAISS's ranking is the answer (exact with
``flat``). Models that take pixels (``model.preprocess``) index a folder of photos or a
raw-image split; unreadable files are skipped and named.

- :func:`build_image_index`, :func:`build_caption_index`, :func:`add_to_index`,
  :func:`rebuild_faiss` write index directories atomically;
- :meth:`GalleryIndex.open` opens one (memory-mapped, checked);
- :meth:`GalleryIndex.search_text` (image index), :meth:`GalleryIndex.search_image`
  (caption index) return :class:`Hit` lists; :meth:`GalleryIndex.attention` gives the
  word-by-region attention of a pair for a heat-map (two-stage indexes).
"""

from __future__ import annotations

from .ann import FAISS_KINDS, FaissOptions
from .build import add_to_index, build_caption_index, build_image_index, rebuild_faiss
from .encode import is_one_stage, takes_pixels
from .index import GalleryIndex, Hit, ImageEntry, plan_depth
from .sources import ImageSource, PhotoSource, photo_source
from .store import FORMAT, ONE_STAGE_VERSION, VERSION, GalleryIndexError, model_fingerprint

__all__ = [
    "FAISS_KINDS",
    "FORMAT",
    "ONE_STAGE_VERSION",
    "VERSION",
    "FaissOptions",
    "GalleryIndex",
    "GalleryIndexError",
    "Hit",
    "ImageEntry",
    "ImageSource",
    "PhotoSource",
    "add_to_index",
    "build_caption_index",
    "build_image_index",
    "is_one_stage",
    "model_fingerprint",
    "photo_source",
    "plan_depth",
    "rebuild_faiss",
    "takes_pixels",
]
