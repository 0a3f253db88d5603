"""The file store: a gallery folder of memory-mapped shards, a FAISS first stage and a SQLite
catalogue (layout in :mod:`.layout`), read side.

A :class:`FileStore` reads one committed *generation* at a time: the catalogue's layout names
the shards and the FAISS file, the catalogue's items give ids, paths, metadata and deleted
flags. :meth:`FileStore.snapshot` holds a catalogue read transaction and makes sure the arrays
of that generation are loaded, so a search never mixes two generations; a change committed by
another process (an add, delete, update, compaction) is picked up by the next snapshot.

First stage (:meth:`FileStore.first_stage`): FAISS covers rows ``[0, faiss rows)``; rows added
since (the tail) are scored exactly and merged. Deleted rows never come back (an ID selector).
A filter selecting at most :data:`EXACT_FILTER_MAX` live items is answered exactly from their
stored vectors (cached per filter and generation); a larger one goes through FAISS with an ID
selector (exact with ``flat``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ...errors import EslmatchError
from ...utils.io import recover_replace
from .. import ann
from ..filters import Filter
from ..layout import (
    GLOBAL,
    LENGTHS,
    MANIFEST,
    SCALE,
    SIDE,
    GalleryIndexError,
    RowReader,
    ShardedArray,
    advise,
    check_records,
    file_resident,
    open_array,
    prefetch,
    read_manifest,
    read_rows,
    release,
    shard_files,
)
from ..records import FaissOptionsRecord, FaissRecord, Layout, LibraryState, Manifest, ShardRecord, StoreInfo
from ..store import Record
from .catalog import CATALOG, Catalog, CatalogError

EXACT_FILTER_MAX = 65536
_R = TypeVar("_R", bound="FileReader")
FILTER_CACHE_BYTES = 128 << 20
MAPPED_BUDGET = 256 << 20  # file-backed bytes a process may leave mapped before release_pages()
_PAGE = 4096
_FAULT_AROUND = 65536
_RETRIES = 5


@dataclass
class Shard:
    """One shard's memory-mapped arrays (``side``/``scale``/``lengths`` ``None`` for a
    one-stage gallery) and the first row it holds."""

    dir: str
    rows: int
    width: int
    first: int
    vectors: np.ndarray
    side: np.ndarray | None = None
    scale: np.ndarray | None = None
    lengths: np.ndarray | None = None


@dataclass
class Loaded:
    """The arrays of one generation (of one catalogue file: ``identity``)."""

    generation: int
    identity: tuple[int, int] | None
    layout: Layout
    shards: list[Shard]
    rows: int
    faiss: ann.FaissIndex | None
    faiss_rows: int
    deleted: np.ndarray
    vectors: ShardedArray | None  # every shard's vectors, None when empty
    lengths: ShardedArray | None  # every shard's lengths (two-stage)
    live: int
    # filter key -> (rows, vectors)
    cache: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=OrderedDict)
    cache_bytes: int = 0
    _live_rows: np.ndarray | None = None
    _tail: np.ndarray | None = None

    def live_rows(self) -> np.ndarray:
        """Every live row, sorted (computed once per generation)."""
        if self._live_rows is None:
            self._live_rows = np.setdiff1d(np.arange(self.rows, dtype=np.int64), self.deleted, assume_unique=True)
        return self._live_rows

    def tail(self) -> np.ndarray:
        """Vectors ``(rows - faiss_rows, Dt)`` of the rows FAISS does not cover (read once)."""
        if self._tail is None:
            assert self.vectors is not None  # rows are stored
            self._tail = np.ascontiguousarray(self.vectors[self.faiss_rows : self.rows], dtype=np.float32)
        return self._tail


class FileReader:
    """A file gallery opened for reading (see the module doc); :class:`~.store.FileStore` adds the writes."""

    def __init__(self, path: Path, manifest: Manifest, catalog: Catalog) -> None:
        self.path = path
        self.where = str(path)
        self.manifest = manifest
        self.catalog = catalog
        self.kind: str = manifest["kind"]
        self.stages: int = manifest["stages"]
        self.total_dim: int = manifest["total_dim"]
        self.dtype: str = manifest["dtype"]
        grid = manifest.get("grid")
        self.grid: tuple[int, int] | None = (int(grid[0]), int(grid[1])) if grid else None
        self._recorded_options: FaissOptionsRecord = {}
        self.search_params: dict[str, int] = {}  # nprobe, ef_search, refine over the recorded ones
        self._loaded: Loaded | None = None
        self._shards: dict[str, Shard] = {}
        self._lock = threading.RLock()
        self.mapped_budget: int | None = MAPPED_BUDGET
        self._resident_base: int | None = file_resident()
        self._mapped = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls: type[_R], path: str | Path, verify: bool = False) -> _R:
        """Open the gallery at ``path`` (a crashed replacement is finished or rolled back first;
        an index of format 1-3 is upgraded). ``verify``: also the sha256 of every file."""
        p = Path(path)
        recover_replace(p)
        if (p / MANIFEST).is_file() and not (p / CATALOG).is_file():
            from .upgrade import upgrade_legacy

            upgrade_legacy(p)
        manifest = read_manifest(p)
        try:
            store = cls(p, manifest, Catalog(p / CATALOG))
        except CatalogError as exc:
            raise GalleryIndexError(str(exc)) from None
        with store.snapshot():
            if verify:
                store.verify()
        return store

    @property
    def one_stage(self) -> bool:
        return self.stages == 1

    @property
    def two_stage(self) -> bool:
        return self.stages == 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r}, kind={self.kind}, stages={self.stages})"

    # ------------------------------------------------------------------ generations
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Loaded]:
        """A consistent view: a catalogue read transaction with that generation's arrays loaded."""
        with self._lock, self.catalog.read():
            yield self._ensure()

    def _ensure(self) -> Loaded:
        gen = self.catalog.generation()
        ident = self.catalog.identity()
        if self._loaded is not None and self._loaded.identity != ident:
            self._rebuilt()  # the generation restarts with a new build: it alone cannot tell
        if self._loaded is not None and self._loaded.generation == gen:
            return self._loaded
        for attempt in range(_RETRIES):
            try:
                self._loaded = self._load(gen)
                return self._loaded
            except FileNotFoundError as exc:
                # a later writer removed files of this generation: read the newest one
                if attempt == _RETRIES - 1:
                    raise GalleryIndexError(
                        f"{self.where}: a file of the gallery is missing ({exc.filename})"
                    ) from None
                self.catalog.conn.execute("COMMIT")
                time.sleep(0.05)
                self.catalog.conn.execute("BEGIN")
                gen = self.catalog.generation()
        raise AssertionError("unreachable")

    def _rebuilt(self) -> None:
        """The gallery was rebuilt in place (``index build --out`` over it): drop everything
        read from the old one; refuse one of another kind, width or model (a restart opens it)."""
        manifest = read_manifest(self.path)
        same = ("kind", "stages", "total_dim", "dtype")
        if any(manifest.get(k) != self.manifest.get(k) for k in same) or (manifest.get("model") or {}).get(
            "fingerprint"
        ) != (self.manifest.get("model") or {}).get("fingerprint"):
            raise GalleryIndexError(
                f"{self.where}: the gallery was rebuilt with another model or kind: open it again (restart the server)"
            )
        self.manifest = manifest
        self._loaded, self._shards = None, {}

    def _load(self, gen: int) -> Loaded:
        layout = self.catalog.layout()
        shards: list[Shard] = []
        first = 0
        for rec in layout.get("shards", []):
            shard = self._shards.get(rec["dir"])
            if shard is None or shard.rows != rec["rows"]:
                shard = self._open_shard(rec, first)
            shard.first = first
            shards.append(shard)
            first += int(rec["rows"])
        self._shards = {s.dir: s for s in shards}
        faiss_rec = layout.get("faiss")
        faiss_index = None
        if faiss_rec and faiss_rec.get("file"):
            faiss_index = self._open_faiss(faiss_rec)
        old = self._loaded
        if old is not None and old.faiss is not None and _faiss_file(old.layout) == _faiss_file(layout):
            faiss_index = old.faiss
        self._recorded_options = dict(faiss_rec.get("options", {})) if faiss_rec else {}
        live, _ = self.catalog.counts()
        return Loaded(
            gen,
            self.catalog.identity(),
            layout,
            shards,
            first,
            faiss_index,
            int(faiss_rec.get("rows", 0)) if faiss_rec else 0,
            self.catalog.deleted_rows(),
            ShardedArray([s.vectors for s in shards]) if shards else None,
            ShardedArray([s.lengths for s in shards if s.lengths is not None]) if shards and self.two_stage else None,
            live,
        )

    def _open_shard(self, rec: ShardRecord, first: int) -> Shard:
        folder = self.path / rec["dir"]
        if not folder.is_dir():
            raise FileNotFoundError(2, "missing shard", str(folder))
        check_records(
            folder,
            rec["files"],
            shard_files(self.two_stage, self.dtype),
            False,
            self.path / CATALOG,
            "shard",
            rec["dir"],
        )
        n, w = int(rec["rows"]), int(rec["width"])
        shard = Shard(rec["dir"], n, w, first, open_array(folder / GLOBAL, True))
        want: list[tuple[str, np.ndarray, tuple[int, ...], str | None]] = [
            (GLOBAL, shard.vectors, (n, self.total_dim), "float32")
        ]
        if self.two_stage:
            shard.side = open_array(folder / SIDE, True)
            shard.lengths = open_array(folder / LENGTHS)
            want += [(SIDE, shard.side, (n, w, self.total_dim), self.dtype), (LENGTHS, shard.lengths, (n,), None)]
            if self.dtype == "int8":
                shard.scale = open_array(folder / SCALE, True)
                want.append((SCALE, shard.scale, (n, w), "float32"))
        for name, arr, shape, dtype in want:
            where = folder / name
            if tuple(arr.shape) != shape:
                raise GalleryIndexError(f"{where}: shape {tuple(arr.shape)}, the catalogue implies {shape}")
            if dtype is not None and arr.dtype != np.dtype(dtype):
                raise GalleryIndexError(f"{where}: dtype {arr.dtype}, the manifest says {dtype}")
        if shard.lengths is not None and n:
            lo, hi = int(shard.lengths.min()), int(shard.lengths.max())
            if lo < 1 or hi > w:
                raise GalleryIndexError(f"{folder / LENGTHS}: lengths span {lo}..{hi}, outside 1..{w}")
        return shard

    def _open_faiss(self, rec: FaissRecord) -> ann.FaissIndex:
        path = self.path / rec["file"]
        if not path.is_file():
            raise FileNotFoundError(2, "missing FAISS index", str(path))
        if path.stat().st_size != rec.get("bytes"):
            raise GalleryIndexError(
                f"{path}: {path.stat().st_size} bytes, the catalogue records {rec.get('bytes')} (truncated or modified)"
            )
        index = ann.read(path)
        if int(index.ntotal) != int(rec["rows"]) or int(index.d) != self.total_dim:
            raise GalleryIndexError(
                f"{path}: holds {index.ntotal} vectors of width {index.d}, the catalogue says {rec['rows']} of width "
                f"{self.total_dim}"
            )
        return index

    def refresh(self) -> bool:
        """Load the newest committed generation; ``True`` when it changed."""
        with self._lock:
            before = None if self._loaded is None else self._loaded.generation
            with self.snapshot() as now:
                return now.generation != before

    # ------------------------------------------------------------------ describing
    @property
    def generation(self) -> int:
        with self.snapshot() as s:
            return s.generation

    def info(self) -> StoreInfo:
        """Live ``count``, ``deleted`` rows not yet compacted, ``rows`` stored, the next
        ``numbered`` id (never reused) and the filterable ``fields`` with their types."""
        with self.snapshot() as s:
            numbered = int(s.layout.get("numbered", s.rows))
            fields = self.catalog.all_types()
            return {
                "count": s.live,
                "deleted": int(s.deleted.size),
                "rows": s.rows,
                "numbered": numbered,
                "fields": fields,
            }

    @property
    def faiss_options(self) -> ann.FaissOptions:
        """The FAISS options searches use: the recorded ones, :attr:`search_params` over them."""
        return ann.FaissOptions.from_dict({**self._recorded_options, **self.search_params})

    @property
    def faiss_kind(self) -> str:
        with self.snapshot() as s:
            return _faiss_kind(s.layout)

    def fields(self) -> dict[str, str]:
        """Metadata fields and their types (builtins ``id``, ``path``, ``added`` not included)."""
        with self.snapshot():
            return self.catalog.types()

    def layout(self) -> Layout:
        with self.snapshot() as s:
            return s.layout.copy()

    def select(
        self,
        where: Filter | None = None,
        fields: Sequence[str] | None = None,
        *,
        ids: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
    ) -> list[Record]:
        """Records in row order, read in one snapshot: of the live items ``where`` selects (all
        without it), or of the live items with these ``ids`` (unknown ones left out), or of these
        stored ``rows``; with their metadata (``fields``: at least those)."""
        with self.snapshot() as s:
            if ids is not None:
                wanted: list[int] | None = list(self.catalog.rows_of([str(i) for i in ids]).values())
            elif rows is not None:
                wanted = [int(r) for r in rows]
            else:
                wanted = None if where is None else self._selected(s, where)[0].tolist()
            recs = self.catalog.records(wanted, fields)
        return [recs[r] for r in sorted(recs)]

    def library(self) -> LibraryState:
        """The photo library's state (roots, exclusions; :mod:`~.library`), ``{}`` if none."""
        with self.snapshot():
            return self.catalog.library()

    # ------------------------------------------------------------------ first stage
    def match(self, where: Filter) -> np.ndarray:
        """Live rows the filter selects (cached per generation)."""
        with self.snapshot() as s:
            return self._selected(s, where)[0]

    def _selected(self, s: Loaded, where: Filter) -> tuple[np.ndarray, np.ndarray | None]:
        """``(rows, their vectors or None)`` of a filter: vectors are read (and cached) when
        the filter is small enough to be answered exactly."""
        hit = s.cache.get(where.key)
        if hit is not None:
            s.cache.move_to_end(where.key)
            return hit
        rows = self.catalog.match(where)
        vectors = None
        if rows.size <= EXACT_FILTER_MAX and s.vectors is not None:
            vectors = read_rows(s.vectors, rows) if rows.size else np.zeros((0, self.total_dim), np.float32)
        s.cache[where.key] = (rows, vectors)
        s.cache_bytes += rows.nbytes + (0 if vectors is None else vectors.nbytes)
        while s.cache_bytes > FILTER_CACHE_BYTES and len(s.cache) > 1:
            _, (r, v) = s.cache.popitem(last=False)
            s.cache_bytes -= r.nbytes + (0 if v is None else v.nbytes)
        return rows, vectors

    def first_stage(self, queries: np.ndarray, n: int, where: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` live items for each query vector ``(Q, Dt)`` by inner product (those
        ``where`` selects, when given): ``(scores (Q, n), rows (Q, n))``, best first, ties by
        row, rows -1 where fewer were found. ``ivfpq`` candidates are re-scored exactly."""
        q = self._query_matrix(queries)
        with self.snapshot() as s:
            n = max(1, int(n))
            if where is not None:
                rows, vectors = self._selected(s, where)
                if vectors is not None:
                    return ann.exact_top(q, vectors, rows, n)
                return self._faiss_and_tail(s, q, n, rows)
            if s.vectors is None:
                return ann.exact_top(q, np.zeros((0, self.total_dim), np.float32), np.zeros(0, np.int64), n)
            return self._faiss_and_tail(s, q, n, s.live_rows() if s.deleted.size else None)

    def _faiss_and_tail(
        self, s: Loaded, q: np.ndarray, n: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS over its rows, exact over the tail, merged (``allowed``: sorted rows, or all)."""
        kind = _faiss_kind(s.layout)
        head = ann.exact_top(q, np.zeros((0, self.total_dim), np.float32), np.zeros(0, np.int64), n)
        if s.faiss is not None and s.faiss_rows:
            sub = None if allowed is None else allowed[allowed < s.faiss_rows]
            if sub is None or sub.size:
                share = 1.0 if sub is None else sub.size / s.faiss_rows
                depth = min(ann.candidates(kind, self.faiss_options, n, s.faiss_rows), s.faiss_rows)
                scores, rows = ann.search(s.faiss, kind, self.faiss_options, q, depth, sub, share)
                if kind == "ivfpq":  # approximate codes: re-score the candidates exactly
                    assert s.vectors is not None
                    head = ann.refine_exact(q, rows, RowReader(s.vectors), n)
                else:
                    head = (scores[:, :n], rows[:, :n].astype(np.int64))
        if s.rows == s.faiss_rows:
            return head
        tail = np.arange(s.faiss_rows, s.rows, dtype=np.int64)
        vectors = s.tail()
        if allowed is not None:
            keep = allowed[allowed >= s.faiss_rows]
            vectors, tail = vectors[keep - s.faiss_rows], keep
        if not tail.size:
            return head
        return ann.merge_top(head, ann.exact_top(q, vectors, tail, n), n)

    def _query_matrix(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.total_dim:
            raise GalleryIndexError(
                f"{self.where}: holds vectors of width {self.total_dim}, the query vectors are {tuple(q.shape)} "
                "(a different model)"
            )
        return q

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """Stored first-stage / index vectors of ``rows`` ``(n, Dt)`` float32."""
        with self.snapshot() as s:
            if s.vectors is None:
                return np.zeros((0, self.total_dim), np.float32)
            return np.asarray(read_rows(s.vectors, np.asarray(rows, dtype=np.int64)), dtype=np.float32)

    # ------------------------------------------------------------------ re-rank rows
    def sides(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored sides of ``rows``: ``(side (n, w, Dt) float32, lengths (n,))`` in the order
        given, trimmed to their longest real length (two-stage galleries)."""
        if not self.two_stage:
            raise EslmatchError(
                f"{self.where}: re-ranking needs a two-stage (ESL) index; this one is one-stage: it stores one "
                "vector per item, whose inner product is the score"
            )
        rows = np.asarray(rows, dtype=np.int64)
        with self.snapshot() as s:
            assert s.lengths is not None  # two-stage
            lens = np.asarray(s.lengths[rows], dtype=np.int64) if rows.size else np.zeros(0, np.int64)
            w = int(lens.max()) if rows.size else 1
            out = np.zeros((rows.size, w, self.total_dim), dtype=np.float32)
            offsets = np.asarray([sh.first for sh in s.shards], dtype=np.int64)
            which = np.searchsorted(offsets, rows, side="right") - 1
            touched = 0
            for k in np.unique(which):
                sh = s.shards[int(k)]
                sel = np.nonzero(which == k)[0]
                local = np.sort(rows[sel] - sh.first)
                order = np.argsort(rows[sel] - sh.first, kind="stable")
                ww = min(w, sh.width)
                assert sh.side is not None
                prefetch(sh.side, local)
                block = np.asarray(sh.side[local, :ww], dtype=np.float32)
                if sh.scale is not None:
                    prefetch(sh.scale, local)
                    block *= np.asarray(sh.scale[local, :ww], dtype=np.float32)[..., None]
                out[sel[order], :ww] = block
                touched += int(local.size) * sh.side[0].nbytes
            self._touched(rows.size, touched // max(1, rows.size))
        return out, lens

    # ------------------------------------------------------------------ memory
    def advise(self, random_access: bool) -> None:
        with self._lock:
            for sh in self._shards.values():
                for arr in (sh.side, sh.scale, sh.vectors):
                    if arr is not None:
                        advise(arr, random_access)

    def release_pages(self) -> None:
        """Unmap the shard pages searches touched (they stay in the page cache)."""
        with self._lock:
            for sh in self._shards.values():
                for arr in (sh.side, sh.scale, sh.vectors):
                    if arr is not None:
                        release(arr)
            self._mapped = 0
            self._resident_base = file_resident()

    def _touched(self, rows: int, row_bytes: int) -> None:
        """Release the maps once the file-backed resident memory grew by ``mapped_budget``."""
        if self.mapped_budget is None:
            return
        now = file_resident()
        if now is None:
            self._mapped += rows * (-(-row_bytes // _PAGE) * _PAGE + _FAULT_AROUND)
            grown = self._mapped
        else:
            if self._resident_base is None:
                self._resident_base = now
            grown = now - self._resident_base
        if grown > self.mapped_budget:
            self.release_pages()

    # ------------------------------------------------------------------ checks
    def verify(self) -> None:
        """Every file of the current generation with its recorded size and sha256, and the
        catalogue's integrity."""
        with self.snapshot() as s:
            for rec in s.layout.get("shards", []):
                folder = self.path / rec["dir"]
                check_records(
                    folder,
                    rec["files"],
                    shard_files(self.two_stage, self.dtype),
                    True,
                    self.path / CATALOG,
                    "shard",
                    rec["dir"],
                )
            faiss_rec = s.layout.get("faiss")
            if faiss_rec and faiss_rec.get("file"):
                name = Path(faiss_rec["file"])
                check_records(self.path / name.parent, {name.name: faiss_rec}, [name.name], True, self.path / CATALOG)
            self.catalog.integrity()

    def close(self) -> None:
        with self._lock:
            self._loaded = None
            self._shards = {}
            self.catalog.close()


def _faiss_file(layout: Layout) -> str | None:
    """The FAISS file ``layout`` uses (``None``: none)."""
    rec = layout.get("faiss")
    return rec.get("file") if rec else None


def _faiss_kind(layout: Layout) -> str:
    """The kind of ``layout``'s first stage (``flat`` where it has none)."""
    rec = layout.get("faiss")
    return str(rec.get("kind", "flat")) if rec else "flat"


__all__ = ["EXACT_FILTER_MAX", "FileReader", "Loaded", "Shard"]
