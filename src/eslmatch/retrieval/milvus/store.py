"""The Milvus store: a gallery in Milvus collections (layout in :mod:`.write`).

Stateless query servers over a shared, sharded store: any number of them can serve one
collection. The first stage is a Milvus search (inner product; a filter becomes a Milvus
expression rendered by :func:`~eslmatch.retrieval.filters.to_milvus`), the level features of the
shortlist are fetched by primary key for the re-rank. Deletes are Milvus's own; an update
rewrites the items' entities with their new metadata. A server caches what recent searches
returned (bounded) and re-reads the manifest every :data:`REFRESH_S` seconds.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import EslmatchError
from ...model.base import MatchingModel
from .. import ann
from ..files.commit import AddReport, BuildOptions
from ..filters import Filter, In, check, to_milvus
from ..layout import GalleryIndexError
from ..metadata import BUILTIN, Metadata, MetadataError, merge_types
from ..policy import check_known
from ..records import FaissOptionsRecord, LibraryState, MilvusManifest, ModelRecord, StoreInfo
from ..sources import Source
from ..store import Record
from .conn import (
    DEFAULT_TIMEOUT,
    KEY_STRIDE,
    LEVELS_SUFFIX,
    MAX_TOPK,
    MilvusConnection,
    MilvusError,
    as_vector,
    check_collection_name,
    load,
    pk,
    read_manifest,
    write_manifest,
)
from .write import _RPC_BYTES, add_to_collection, build_collection, collections_of, send

REFRESH_S = 2.0  # how often a server re-reads the manifest (fields, a rebuilt collection)
_CACHE_ROWS = 65536
_FIXED = {"id": "item_id", "path": "path"}


def _check_open(manifest: MilvusManifest, where: str) -> None:
    if manifest.get("state") != "complete":
        total = manifest.get("build", {}).get("total")
        raise GalleryIndexError(
            f"{where}: its build is unfinished (interrupted, or still running; {total} items planned): rerun the same "
            "'eslmatch index build' to resume it"
        )


class MilvusStore:
    """An image gallery in Milvus (see the module doc); :meth:`open` it."""

    kind = "image"

    def __init__(self, conn: MilvusConnection, collection: str, manifest: MilvusManifest) -> None:
        self.conn, self.collection = conn, collection
        self.where = f"collection {collection!r} at {conn.uri}"
        self._recorded_options: FaissOptionsRecord = {}
        self.search_params: dict[str, int] = {}  # nprobe, ef_search, refine over the recorded ones
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, Record] = OrderedDict()
        self._count: tuple[float, int] | None = None
        self._apply(manifest)

    def _apply(self, m: MilvusManifest) -> None:
        self.manifest = m
        self.stages = int(m["stages"])
        assert m["total_dim"] is not None  # an open gallery is complete
        self.total_dim = int(m["total_dim"])
        self.dtype = str(m["dtype"])
        grid = m.get("grid")
        self.grid = (int(grid[0]), int(grid[1])) if grid else None
        self.faiss_kind = str(m["index"]["kind"])
        self._recorded_options = dict(m["index"].get("options", {}))
        self._refreshed = time.monotonic()
        # the rows of an add not committed yet (or killed): not the gallery's until it is
        adding = m.get("adding")
        self._pending = int(adding["start"]) if adding else None

    def _visible(self, expr: str = "") -> str:
        """``expr`` over the committed rows only (unchanged while no add is pending)."""
        if self._pending is None:
            return expr
        return f"({expr}) and row < {self._pending}" if expr else f"row < {self._pending}"

    @classmethod
    def open(cls, uri: str, collection: str, timeout: float = DEFAULT_TIMEOUT, token: str | None = None) -> MilvusStore:
        """Connect and open ``collection`` (loading it into Milvus's memory): one line when
        Milvus is unreachable, or the collection is missing, unfinished or not a gallery."""
        check_collection_name(collection)
        conn = MilvusConnection(uri, timeout, token)
        where = f"collection {collection!r} at {uri}"
        m = read_manifest(conn, collection)
        if m is None:
            conn.close()
            raise GalleryIndexError(f"{where}: no such collection (build it with 'eslmatch index build --milvus')")
        _check_open(m, where)
        store = cls(conn, collection, m)
        dim = ((m.get("_fields", {}).get("vec") or {}).get("params") or {}).get("dim")
        if dim is not None and int(dim) != store.total_dim:
            raise GalleryIndexError(f"{where}: its vectors have width {dim}, the manifest says {store.total_dim}")
        load(conn, collections_of(collection, m))
        return store

    @property
    def one_stage(self) -> bool:
        return self.stages == 1

    def __repr__(self) -> str:
        return f"MilvusStore({self.where}, stages={self.stages})"

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A Milvus call; a collection found released (a restarted server) is loaded again."""
        try:
            return self.conn.call(what, method, *args, **kwargs)
        except MilvusError as exc:
            if not any(w in str(exc).lower() for w in ("not loaded", "released", "load()")):
                raise
        load(self.conn, collections_of(self.collection, self.manifest))
        return self.conn.call(what, method, *args, **kwargs)

    # ------------------------------------------------------------------ freshness
    def refresh(self, force: bool = True) -> bool:
        """Re-read the manifest (``force=False``: at most every :data:`REFRESH_S` s); a
        collection rebuilt or dropped meanwhile is refused."""
        if not force and time.monotonic() - self._refreshed < REFRESH_S:
            return False
        m = read_manifest(self.conn, self.collection)
        if m is None:
            raise GalleryIndexError(f"{self.where}: the collection was dropped")
        _check_open(m, self.where)
        rebuilt = m["build"]["id"] != self.manifest["build"]["id"]
        if rebuilt:
            with self._lock:
                self._cache.clear()
        self._count = None
        changed = rebuilt or m.get("modified") != self.manifest.get("modified")
        self._apply(m)
        return changed

    @property
    def faiss_options(self) -> ann.FaissOptions:
        """The search options: the recorded ones, :attr:`search_params` over them."""
        return ann.FaissOptions.from_dict({**self._recorded_options, **self.search_params})

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[MilvusStore]:
        self.refresh(force=False)
        yield self

    def _live(self) -> int:
        """Live items (``count(*)``; cached for a second)."""
        now = time.monotonic()
        if self._count is None or now - self._count[0] > 1.0:
            got = self._call(
                f"counting {self.where}", "query", self.collection, filter=self._visible(), output_fields=["count(*)"]
            )
            self._count = (now, int(got[0]["count(*)"]))
        return self._count[1]

    def info(self) -> StoreInfo:
        """As the file store's :meth:`~eslmatch.retrieval.files.reader.FileReader.info`."""
        return {
            "count": self._live(),
            "deleted": int(self.manifest.get("deleted") or 0),
            "rows": int(self.manifest.get("next_row") or 0),
            "numbered": int(self.manifest.get("next_row") or 0),  # rows are never reused here
            "fields": self.filter_fields(),
        }

    def fields(self) -> dict[str, str]:
        return dict(self.manifest.get("fields") or {})

    def filter_fields(self) -> dict[str, str]:
        return {"id": "str", "path": "str", "added": "str", **self.fields()}

    def expression(self, where: Filter) -> str:
        check(where, self.filter_fields())
        return to_milvus(where, lambda f: _FIXED.get(f, f), lambda f: f not in _FIXED)

    # ------------------------------------------------------------------ rows
    def _out_fields(self) -> list[str]:
        return (
            ["row", "item_id", "path", "length", "$meta"] if self.stages == 2 else ["row", "item_id", "path", "$meta"]
        )

    def _record(self, e: Any) -> Record:
        e = e.get("entity", e)
        meta = {
            k: v for k, v in e.items() if k not in ("row", "item_id", "path", "length", "vec", "added", "$meta", "id")
        }
        return Record(
            pk(e, "row"),
            str(e["item_id"]),
            str(e.get("path") or ""),
            str(e.get("added") or ""),
            None,
            meta,
            int(e.get("length") or 1),
        )

    def _remember(self, recs: Sequence[Record]) -> None:
        with self._lock:
            for rec in recs:
                self._cache[rec.row] = rec
                self._cache.move_to_end(rec.row)
            while len(self._cache) > max(_CACHE_ROWS, 2 * len(recs)):
                self._cache.popitem(last=False)

    def _records(self, rows: Sequence[int], missing_ok: bool = False) -> dict[int, Record]:
        with self._lock:
            out = {int(r): self._cache[int(r)] for r in rows if int(r) in self._cache}
        missing = sorted({int(r) for r in rows} - out.keys())
        for i in range(0, len(missing), MAX_TOPK):
            part = missing[i : i + MAX_TOPK]
            got = [
                self._record(g)
                for g in self._call(
                    f"reading items of {self.where}", "get", self.collection, ids=part, output_fields=self._out_fields()
                )
            ]
            if self._pending is not None:
                got = [r for r in got if r.row < self._pending]
            if len(got) < len(part) and not missing_ok:
                lost = sorted(set(part) - {r.row for r in got})
                raise GalleryIndexError(f"{self.where}: no item at row {lost[0]}")
            self._remember(got)
            out.update({r.row: r for r in got})
        return out

    def _query(self, expr: str, limit: int = MAX_TOPK) -> list[Record]:
        got = self._call(
            f"querying {self.where}",
            "query",
            self.collection,
            filter=self._visible(expr),
            output_fields=self._out_fields(),
            limit=limit,
        )
        recs = [self._record(g) for g in got]
        self._remember(recs)
        return recs

    def _ids_expr(self, ids: Sequence[str]) -> str:
        return to_milvus(Filter(In("id", tuple(ids)), ""), lambda f: "item_id", lambda f: False)

    def scan(self, expr: str = "row >= 0") -> Iterator[Record]:
        """Every item matching ``expr`` in row order (reads them all)."""
        last = -1
        while True:
            got = self._query(f"({expr}) and row > {last}")
            if not got:
                return
            got.sort(key=lambda r: r.row)
            yield from got
            last = got[-1].row

    def select(
        self,
        where: Filter | None = None,
        fields: Sequence[str] | None = None,
        *,
        ids: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
    ) -> list[Record]:
        """As the file store's :meth:`~eslmatch.retrieval.files.reader.FileReader.select`
        (Milvus returns every field)."""
        if ids is not None:
            found: list[Record] = []
            for i in range(0, len(ids), 1000):
                found += self._query(self._ids_expr([str(x) for x in ids[i : i + 1000]]))
            return sorted(found, key=lambda r: r.row)
        if rows is not None:  # those still stored (a deleted entity is gone from Milvus)
            recs = self._records(rows, missing_ok=True)
            return [recs[r] for r in sorted(recs)]
        return list(self.scan() if where is None else self.scan(self.expression(where)))

    def library(self) -> LibraryState:
        """The photo library's state (roots, exclusions; :mod:`~.library`), ``{}`` if none."""
        m = read_manifest(self.conn, self.collection) or self.manifest
        return m.get("library", {}).copy()

    # ------------------------------------------------------------------ first stage and re-rank
    def first_stage(self, queries: np.ndarray, n: int, where: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` for each query ``(Q, Dt)`` by inner product, searched in Milvus (those
        ``where`` selects): ``(scores, rows)``, rows -1 where fewer were found."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.total_dim:
            raise GalleryIndexError(
                f"{self.where}: holds vectors of width {self.total_dim}, the queries are {tuple(q.shape)} (a different model)"
            )
        n = max(1, int(n))
        limit = min(n, MAX_TOPK)
        params: dict[str, Any] = {}
        if self.faiss_kind == "ivf":
            params["nprobe"] = int(self.faiss_options.nprobe or 16)
        elif self.faiss_kind == "hnsw":
            params["ef"] = max(int(self.faiss_options.ef_search), limit)
        expr = self._visible("" if where is None else self.expression(where))
        scores = np.full((q.shape[0], n), -np.inf, dtype=np.float32)
        rows = np.full((q.shape[0], n), -1, dtype=np.int64)
        for b0 in range(0, q.shape[0], 256):
            res = self._call(
                f"searching {self.where}",
                "search",
                self.collection,
                data=list(q[b0 : b0 + 256]),
                filter=expr,
                limit=limit,
                anns_field="vec",
                search_params={"metric_type": "IP", "params": params},
                output_fields=self._out_fields()[1:],
            )
            for j, hits in enumerate(res):
                recs = [self._record({**h.get("entity", {}), "row": pk(h, "row")}) for h in hits]
                self._remember(recs)
                scores[b0 + j, : len(recs)] = [float(h["distance"]) for h in hits]
                rows[b0 + j, : len(recs)] = [r.row for r in recs]
        return scores, rows

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        rows = [int(r) for r in rows]
        got = self._call(
            f"reading vectors of {self.where}", "get", self.collection, ids=rows, output_fields=["row", "vec"]
        )
        found = {pk(g, "row"): as_vector(g["vec"], "float32") for g in got}
        if any(r not in found for r in rows):
            raise GalleryIndexError(f"{self.where}: no item at row {next(r for r in rows if r not in found)}")
        return (
            np.stack([found[r] for r in rows]).astype(np.float32) if rows else np.zeros((0, self.total_dim), np.float32)
        )

    def sides(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sides ``(n, w, Dt)`` float32 (zero beyond each one's regions) and lengths of ``rows``,
        from the level collection."""
        if self.stages != 2:
            raise EslmatchError(f"{self.where}: re-ranking needs a two-stage (ESL) gallery; this one is one-stage")
        recs = self._records(rows.tolist())
        lens = np.asarray([recs[int(r)].length for r in rows], dtype=np.int64)
        lv = self.manifest["levels"]
        assert lv is not None  # a two-stage gallery's
        chunk, dt = int(lv["chunk"]), self.total_dim
        out = np.zeros((len(rows), int(lens.max()) if len(rows) else 1, dt), dtype=np.float32)
        keys = [int(r) * KEY_STRIDE + c for r, n in zip(rows, lens) for c in range(math.ceil(int(n) / chunk))]
        step = max(1, min(MAX_TOPK, _RPC_BYTES // (chunk * dt * 4)))
        found: dict[int, np.ndarray] = {}
        levels = self.collection + LEVELS_SUFFIX
        for i in range(0, len(keys), step):
            got = self._call(
                f"reading level features from {levels!r}",
                "get",
                levels,
                ids=keys[i : i + step],
                output_fields=["key", "vec"],
            )
            found.update({pk(g, "key"): as_vector(g["vec"], lv.get("field", "float32")) for g in got})
        where = {int(r): j for j, r in enumerate(rows)}
        for key in keys:
            row, c = divmod(key, KEY_STRIDE)
            v = found.get(key)
            if v is None or v.size != chunk * dt:
                raise GalleryIndexError(
                    f"{self.where}: the level features of item {recs[row].id!r} are missing or damaged in {levels!r}; rebuild it"
                )
            j = where[row]
            n = min(chunk, int(lens[j]) - c * chunk)
            out[j, c * chunk : c * chunk + n] = v.reshape(chunk, dt)[:n]
        return out, lens

    # ------------------------------------------------------------------ changes
    def add(
        self,
        model: MatchingModel,
        source: Source,
        record: ModelRecord,
        on_duplicate: str = "skip",
        options: BuildOptions | None = None,
    ) -> AddReport:
        self.refresh()
        rep, replaced = add_to_collection(
            model,
            source,
            self.conn,
            self.collection,
            self.manifest,
            on_duplicate,
            options or BuildOptions(),
        )
        if replaced:
            self._delete_rows(replaced)
        self.refresh()
        return AddReport(rep.written + rep.present, rep.duplicates, len(replaced), [], self._live())

    def _delete_rows(self, rows: Sequence[int]) -> int:
        rows = sorted({int(r) for r in rows})
        for i in range(0, len(rows), MAX_TOPK):
            part = rows[i : i + MAX_TOPK]
            self._call(f"deleting from {self.where}", "delete", self.collection, ids=part)
            if self.stages == 2:
                levels = self.collection + LEVELS_SUFFIX
                self._call(
                    f"deleting from {levels!r}", "delete", levels, filter=f"row in [{', '.join(map(str, part))}]"
                )
        with self._lock:
            for r in rows:
                self._cache.pop(r, None)
        m = read_manifest(self.conn, self.collection) or self.manifest
        m["deleted"] = int(m.get("deleted") or 0) + len(rows)
        write_manifest(self.conn, self.collection, m)
        self._count = None
        self._apply(m)
        return len(rows)

    def delete(self, ids: Sequence[str] | None = None, where: Filter | None = None) -> int:
        rows: set[int] = set()
        if ids:
            found: dict[str, int] = {}
            for i in range(0, len(ids), 1000):
                found.update({r.id: r.row for r in self._query(self._ids_expr(list(ids[i : i + 1000])))})
            check_known(self.where, ids, found, "deleted")
            rows.update(found.values())
        if where is not None:
            rows.update(r.row for r in self.scan(self.expression(where)))
        return self._delete_rows(sorted(rows)) if rows else 0

    def update(
        self,
        changes: Mapping[str, Metadata],
        paths: Mapping[str, str] | None = None,
        library: LibraryState | None = None,
        restore: Sequence[str] = (),
    ) -> int:
        """Rewrite the items' entities with their metadata changed (``None`` clears a field)
        and the ``paths`` of moved ones; the photo ``library``'s state goes into the manifest.
        Milvus deletes are final: nothing in ``restore`` comes back (their changes are dropped)."""
        self.refresh()
        paths = paths or {}
        ids = list({**changes, **paths})
        entities: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), 1000):
            got = self._call(
                f"reading items of {self.where}",
                "query",
                self.collection,
                filter=self._visible(self._ids_expr(ids[i : i + 1000])),
                output_fields=["*"],
                limit=1000,
            )
            entities.update({str(e["item_id"]): dict(e) for e in got})
        ids = [i for i in ids if i in entities or i not in restore]
        check_known(self.where, ids, entities, "updated")
        types = merge_types(self.fields(), ({"id": k, **changes.get(k, {})} for k in ids))
        out = []
        for item in ids:
            e = {k: v for k, v in entities[item].items() if k not in ("$meta",)}
            for k, v in changes.get(item, {}).items():
                if k in BUILTIN:
                    raise MetadataError(f"{k!r} is a builtin field; it cannot be updated")
                e.pop(k, None) if v is None else e.__setitem__(k, v)
            if item in paths:
                e["path"] = paths[item]
            e["vec"] = np.asarray(e["vec"], dtype=np.float32)
            out.append(e)
        if out:
            send(self.conn, self.collection, out, self.total_dim * 4 + 512)
        m = read_manifest(self.conn, self.collection) or self.manifest
        m["fields"] = types
        if library is not None:
            m["library"] = library.copy()
        write_manifest(self.conn, self.collection, m)
        with self._lock:
            for e in out:
                self._cache.pop(int(e["row"]), None)
        self._apply(m)
        return len(out)

    def compact(self) -> dict[str, int]:
        """Ask Milvus to compact the collections (it reclaims deleted entities itself)."""
        for coll in collections_of(self.collection, self.manifest):
            self._call(f"compacting {coll!r}", "compact", coll)
        m = read_manifest(self.conn, self.collection) or self.manifest
        removed = int(m.get("deleted") or 0)
        m["deleted"] = 0
        write_manifest(self.conn, self.collection, m)
        self._apply(m)
        return {"removed": removed, "count": self._live(), "shards": 0}

    def close(self) -> None:
        self.conn.close()


def build_milvus(
    model: MatchingModel,
    source: Source,
    uri: str,
    collection: str,
    options: BuildOptions,
    record: ModelRecord,
    overwrite: bool = False,
    shards: int | None = None,
    replicas: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> MilvusStore:
    """Build (or resume) an image gallery in ``collection`` at ``uri``; returns it opened."""
    check_collection_name(collection)
    conn = MilvusConnection(uri, timeout, token)
    try:
        rep = build_collection(model, source, conn, collection, options, record, overwrite, shards)
        if replicas:
            m = read_manifest(conn, collection)
            load(conn, collections_of(collection, m) if m else (collection,), replicas)
    finally:
        conn.close()
    store = MilvusStore.open(uri, collection, timeout, token)
    store.last_write = rep  # type: ignore[attr-defined]
    return store


def describe_collection(uri: str, collection: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The manifest of an eslmatch gallery in Milvus (a dict; raises when there is none)."""
    check_collection_name(collection)
    conn = MilvusConnection(uri, timeout)
    try:
        m = read_manifest(conn, collection)
    finally:
        conn.close()
    if m is None:
        raise GalleryIndexError(f"collection {collection!r} at {uri}: no such collection")
    return {k: v for k, v in m.items() if not k.startswith("_")}
