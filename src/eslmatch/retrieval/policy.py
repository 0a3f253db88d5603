"""Store-neutral rules of a gallery's writes, applied by :class:`~.gallery.Gallery` before a
store writes anything, so that the file store and Milvus behave the same (light: the CLI
reads :data:`ON_DUPLICATE` before anything heavy is imported)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import EslmatchError

if TYPE_CHECKING:
    from .sources import Source
    from .store import GalleryStore

ON_DUPLICATE = ("skip", "replace", "error")  # what an add does with an id the gallery holds


def check_on_duplicate(value: str) -> str:
    if value not in ON_DUPLICATE:
        raise EslmatchError(f"on_duplicate must be {', '.join(ON_DUPLICATE[:-1])} or {ON_DUPLICATE[-1]}, got {value!r}")
    return value


def keep_user_metadata(store: GalleryStore, source: Source) -> None:
    """Before ``on_duplicate="replace"``: give each item of ``source`` that replaces a stored one
    the user metadata of the stored item, under what the caller gave for it (a replaced photo
    keeps its tags; the fields it records by itself are recorded anew)."""
    from .metadata import BUILTIN
    from .sources import AUTO_FIELDS

    recorded = AUTO_FIELDS if source.root is not None else ()  # photos under a root record them
    for item_id in source.ids:
        if not store.contains(item_id):
            continue
        old = {k: v for k, v in store.metadata(item_id).items() if k not in BUILTIN and k not in recorded}
        if old:
            source.user_metadata[item_id] = {**old, **source.user_metadata.get(item_id, {})}
