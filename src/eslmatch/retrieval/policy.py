"""Store-neutral rules of a gallery's writes, applied by :class:`~.gallery.Gallery` before a
store writes anything, so that the file store and Milvus behave the same."""

from __future__ import annotations

from .metadata import BUILTIN, Metadata
from .search import GalleryStore
from .sources import AUTO_FIELDS, Source


def keep_user_metadata(store: GalleryStore, source: Source) -> None:
    """Before ``on_duplicate="replace"``: give each item of ``source`` that replaces a stored one
    the user metadata of the stored item, under what the caller gave for it (a replaced photo
    keeps its tags; the fields it records by itself are recorded anew)."""
    recorded = AUTO_FIELDS if source.root is not None else ()  # photos under a root record them
    for item_id in source.ids:
        if not store.contains(item_id):
            continue
        old: Metadata = {k: v for k, v in store.metadata(item_id).items() if k not in BUILTIN and k not in recorded}
        if old:
            source.user_metadata[item_id] = {**old, **source.user_metadata.get(item_id, {})}
