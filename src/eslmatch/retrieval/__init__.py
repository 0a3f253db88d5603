"""Galleries: a living collection searched with ESL (see ``docs/retrieval.md``).

- :func:`open_gallery` / :func:`build_gallery` -> :class:`Gallery`: ``search``, ``similar``,
  ``add``, ``delete``, ``update``, ``compact``, ``len``, ``metadata``; the same on both stores.
- Stores (the :class:`GalleryStore` protocol): :class:`FileStore` (a folder: FAISS first
  stage, memory-mapped shards, a SQLite catalogue) and
  :class:`~eslmatch.retrieval.milvus.store.MilvusStore` (Milvus collections).
- :class:`Searcher`: tokenise -> encode -> shortlist -> re-rank, for any store. Two-stage for
  ESL (the first-stage vectors' inner product is a pair's mean word-region affinity, the full
  ESL score re-ranks the shortlist); one-stage and exact for single-vector models (VSE,
  ESL-CLIP: the inner product of the index vectors IS the score).
- Sources (:func:`source_for`, :func:`regions`, :func:`photos`, :func:`captions`): what a
  gallery is built from or extended with, with ids, paths and metadata.
- Filters (:func:`parse_filter`): ``folder == "trips" and taken >= "2024-01-01"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

if TYPE_CHECKING:
    from ..model.identity import model_fingerprint
    from .ann import AUTO, AUTO_FLAT_MAX, FAISS_KINDS, FaissOptions
    from .files.commit import AddReport, BuildOptions
    from .files.store import FileStore
    from .filters import Filter, FilterError, parse_filter
    from .gallery import Gallery, build_gallery, open_gallery
    from .layout import FORMAT, VERSION, GalleryIndexError
    from .metadata import MetadataError, read_metadata
    from .search import Hit, Searcher, plan_depth
    from .sources import CaptionSource, PhotoSource, RegionSource, Source, captions, photos, regions, source_for
    from .store import GalleryStore, Record

# imported on first use: the CLI checks a filter (filters) before FAISS and torch are imported
__getattr__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(("AUTO", "AUTO_FLAT_MAX", "FAISS_KINDS", "FaissOptions"), ".ann"),
        "Record": ".store",
        **dict.fromkeys(("AddReport", "BuildOptions"), ".files.commit"),
        "FileStore": ".files.store",
        **dict.fromkeys(("Filter", "FilterError", "parse_filter"), ".filters"),
        **dict.fromkeys(("Gallery", "build_gallery", "open_gallery"), ".gallery"),
        **dict.fromkeys(("FORMAT", "VERSION", "GalleryIndexError"), ".layout"),
        **dict.fromkeys(("MetadataError", "read_metadata"), ".metadata"),
        "model_fingerprint": "..model.identity",
        **dict.fromkeys(("Hit", "Searcher", "plan_depth"), ".search"),
        "GalleryStore": ".store",
        **dict.fromkeys(
            ("CaptionSource", "PhotoSource", "RegionSource", "Source", "captions", "photos", "regions", "source_for"),
            ".sources",
        ),
    },
)

__all__ = [
    "AUTO",
    "AUTO_FLAT_MAX",
    "FAISS_KINDS",
    "FORMAT",
    "VERSION",
    "AddReport",
    "BuildOptions",
    "CaptionSource",
    "FaissOptions",
    "FileStore",
    "Filter",
    "FilterError",
    "Gallery",
    "GalleryIndexError",
    "GalleryStore",
    "Hit",
    "MetadataError",
    "PhotoSource",
    "Record",
    "RegionSource",
    "Searcher",
    "Source",
    "build_gallery",
    "captions",
    "model_fingerprint",
    "open_gallery",
    "parse_filter",
    "photos",
    "plan_depth",
    "read_metadata",
    "regions",
    "source_for",
]
