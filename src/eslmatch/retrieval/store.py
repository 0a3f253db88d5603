"""The store protocol: what a searcher and a gallery need of a store, and all a store offers.

Two implementations: the file store (:class:`~eslmatch.retrieval.files.store.FileStore`: FAISS +
shards + a SQLite catalogue) and Milvus (:class:`~eslmatch.retrieval.milvus.store.MilvusStore`).
Rules about items (ids, duplicates, metadata kept, exclusions, the model check) are not here:
they are the gallery's (``policy.py``, ``library.py``), the same on both stores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .filters import Filter
from .metadata import Metadata
from .records import GalleryManifest, LibraryState, ModelRecord, StoreInfo

if TYPE_CHECKING:
    from ..model.base import MatchingModel
    from .sources import Source


@dataclass(slots=True)
class Record:
    """What the catalogue knows of one item (not frozen: a million are made for a listing,
    three times faster so; nothing changes one)."""

    row: int
    id: str
    path: str
    added: str
    caption: str | None
    metadata: Metadata
    length: int = 0  # real regions / words (a Milvus record; the file store keeps them in shards)

    def fields(self) -> Metadata:
        """Every field, builtins included (what a filter sees)."""
        return {"id": self.id, "path": self.path, "added": self.added, **self.metadata}


class GalleryStore(Protocol):
    """What a searcher (and a gallery) needs of a store: the file store
    (:class:`~eslmatch.retrieval.files.store.FileStore`) and the Milvus store
    (:class:`~eslmatch.retrieval.milvus.store.MilvusStore`) implement it. Reads: ``info``
    (counts, fields), ``select`` (records by filter, ids or rows), ``vectors`` / ``sides``
    (what is stored of rows), ``first_stage``, ``library``; writes: ``add``, ``delete``,
    ``update`` (metadata, moved paths, library state, deleted items brought back before
    ``compact`` where the store can), ``compact``."""

    where: str
    kind: str
    stages: int
    total_dim: int
    dtype: str  # of the stored image sides / caption features
    grid: tuple[int, int] | None
    search_params: dict[str, int]  # nprobe / ef_search / refine over the recorded ones (checked at search)

    @property
    def manifest(self) -> GalleryManifest: ...
    def snapshot(self) -> AbstractContextManager[object]: ...
    def info(self) -> StoreInfo: ...
    def first_stage(
        self, queries: np.ndarray, n: int, where: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def sides(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def vectors(self, rows: Sequence[int]) -> np.ndarray: ...
    def select(
        self,
        where: Filter | None = None,
        fields: Sequence[str] | None = None,
        *,
        ids: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
    ) -> list[Record]: ...
    def add(
        self,
        model: MatchingModel,
        source: Source,
        record: ModelRecord,
        on_duplicate: str = "skip",
        options: Any = None,  # a files.commit.BuildOptions: importing it here would be an import cycle
    ) -> Any: ...  # an AddReport (files.commit), as options
    def delete(self, ids: Sequence[str] | None = None, where: Filter | None = None) -> int: ...
    def update(
        self,
        changes: Mapping[str, Metadata],
        paths: Mapping[str, str] | None = None,
        library: LibraryState | None = None,
        restore: Sequence[str] = (),
    ) -> int: ...
    def library(self) -> LibraryState: ...
    def compact(self) -> dict[str, int]: ...
    def close(self) -> None: ...
