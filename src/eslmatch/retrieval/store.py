"""The store protocol: what a searcher and a gallery need of a store, and all a store offers.

Two implementations: the file store (:class:`~eslmatch.retrieval.files.store.FileStore`: FAISS +
shards + a SQLite catalogue) and Milvus (:class:`~eslmatch.retrieval.milvus.store.MilvusStore`).
Rules about items (ids, duplicates, metadata kept, exclusions, the model check) are not here:
they are the gallery's (``policy.py``, ``library.py``), the same on both stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .filters import Filter
from .metadata import Metadata

if TYPE_CHECKING:
    from ..model.base import MatchingModel


@dataclass(frozen=True)
class Record:
    """What the catalogue knows of one item."""

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
    (:class:`~eslmatch.retrieval.milvus.store.MilvusStore`) implement it."""

    where: str
    kind: str
    stages: int
    total_dim: int
    grid: tuple[int, int] | None
    manifest: dict[str, Any]

    def snapshot(self) -> Any: ...
    def refresh(self) -> bool: ...
    def count(self) -> int: ...
    def counts(self) -> dict[str, int]: ...
    def filter_fields(self) -> dict[str, str]: ...
    def first_stage(
        self, queries: np.ndarray, n: int, where: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def sides(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def side_row(self, row: int) -> np.ndarray: ...
    def vectors(self, rows: Sequence[int]) -> np.ndarray: ...
    def records(self, rows: Sequence[int]) -> dict[int, Record]: ...
    def row_of(self, item_id: str) -> int: ...
    def metadata(self, item_id: str) -> dict[str, Any]: ...
    def image_path(self, item_id: str) -> str | None: ...
    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, refine: int | None = None
    ) -> None: ...
    def ids(self) -> list[str]: ...
    def sample_paths(self, n: int = 200) -> list[str]: ...
    def add(
        self,
        model: MatchingModel,
        source: Any,
        record: dict[str, Any],
        on_duplicate: str = "skip",
        options: Any = None,
        report: Any = None,
    ) -> Any: ...
    def delete(self, ids: Sequence[str] | None = None, where: Filter | None = None) -> int: ...
    def update(self, changes: Any, paths: Any = None) -> int: ...
    def select(self, where: Filter | None = None, fields: Sequence[str] | None = None) -> list[Record]: ...
    def library(self) -> dict[str, Any]: ...
    def set_library(self, state: Any) -> None: ...
    def compact(self, report: Any = None) -> dict[str, int]: ...
    def close(self) -> None: ...
