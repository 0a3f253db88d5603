"""Store-neutral rules of a gallery's writes, applied by :class:`~.gallery.Gallery` before a
store writes anything, so that the file store and Milvus behave the same (light: the CLI
reads :data:`ON_DUPLICATE` before anything heavy is imported)."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EslmatchError, NotFound

if TYPE_CHECKING:
    from .sources import Source
    from .store import GalleryStore, Record

ON_DUPLICATE = ("skip", "replace", "error")  # what an add does with an id the gallery holds


def check_on_duplicate(value: str) -> str:
    if value not in ON_DUPLICATE:
        raise EslmatchError(f"on_duplicate must be {', '.join(ON_DUPLICATE[:-1])} or {ON_DUPLICATE[-1]}, got {value!r}")
    return value


def check_known(where: str, ids: Sequence[str], found: Container[str], action: str) -> None:
    """Refuse, in one line naming the first, ids the gallery does not hold (``action``: what
    was to be done, and is not: "deleted", "updated")."""
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise NotFound(f"{where}: no item with id {unknown[0]!r} ({len(unknown)} unknown; nothing {action})")


def records_of(store: GalleryStore, ids: Sequence[str]) -> list[Record]:
    """The stored records of ``ids`` (unknown ones left out), in row order."""
    return store.select(ids=ids)


def item_record(store: GalleryStore, item_id: str, fields: Sequence[str] | None = None) -> Record:
    """The record of the live item ``item_id`` (read in one snapshot), or one line naming it."""
    found = store.select(fields=fields, ids=[str(item_id)])
    if not found:
        raise NotFound(f"{store.where}: no item with id {str(item_id)!r}")
    return found[0]


def keep_user_metadata(store: GalleryStore, source: Source) -> None:
    """Before ``on_duplicate="replace"``: give each item of ``source`` that replaces a stored one
    the user metadata of the stored item, under what the caller gave for it (a replaced photo
    keeps its tags; the fields it records by itself are recorded anew)."""
    from .metadata import BUILTIN
    from .sources import AUTO_FIELDS

    recorded = AUTO_FIELDS if source.root is not None else ()  # photos under a root record them
    for rec in records_of(store, source.ids):
        old = {k: v for k, v in rec.metadata.items() if k not in BUILTIN and k not in recorded}
        if old:
            source.user_metadata[rec.id] = {**old, **source.user_metadata.get(rec.id, {})}


_COUNTED = ("count", "skipped", "skipped_files")


def add_source(sources: Sequence[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """The gallery's list of sources with ``record`` added: a folder of photos (or a server's
    uploads) added again is counted into its earlier record of the same encoding, anything
    else appended. A server's every upload added a line to ``index info`` and grew the
    manifest without end."""
    same = {k: v for k, v in record.items() if k not in _COUNTED}
    out = list(sources)
    for i, old in enumerate(out):
        if ("images" in same or "uploads" in same) and {k: v for k, v in old.items() if k not in _COUNTED} == same:
            merged = {**old, "count": old.get("count", 0) + record.get("count", 0)}
            if record.get("skipped") or old.get("skipped"):
                merged["skipped"] = old.get("skipped", 0) + record.get("skipped", 0)
                merged["skipped_files"] = [*old.get("skipped_files", []), *record.get("skipped_files", [])][:1000]
            out[i] = merged
            return out
    return [*out, record]
