"""Writing a gallery into Milvus: the collections, the sink of the one writer path, build, add.

``NAME`` holds one entity per image: ``row`` INT64 primary key, ``item_id``, ``path``,
``length`` INT32 (real regions; two-stage only), ``vec`` FLOAT_VECTOR (the first-stage vector of
an ESL model, or the index vector of a single-vector model) and, in the dynamic part, the
metadata (``added``, ``folder``, ``taken``, the user's fields). ``NAME_levels`` (two-stage
only) holds the engine-ready sides, ``chunk`` regions of ``Dt`` per entity (``key = row *
65536 + c``). Items are upserted (idempotent), an item's level entities before its main
entity; a rerun of an interrupted build or add writes only the rows not stored yet.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import __version__
from ...errors import Conflict, EslmatchError, counted
from ...model.base import MatchingModel
from ...utils.messages import note
from .. import ann
from ..encoding import Encoded, Encoding, default_encoding
from ..files.commit import BuildOptions, encoding_of
from ..metadata import Metadata, merge_types, now
from ..models import check_model
from ..policy import add_source
from ..records import MilvusManifest, ModelRecord
from ..sources import Source, subset
from ..writer import Chunk, WriteReport, cut, write_source
from .conn import (
    FORMAT,
    KEY_STRIDE,
    LEVELS_SUFFIX,
    MAX_DIM,
    MAX_ID_CHARS,
    MAX_PATH_CHARS,
    MAX_TOPK,
    VERSION,
    MilvusConnection,
    MilvusError,
    index_params,
    load,
    pk,
    read_manifest,
    require_pymilvus,
    write_manifest,
)

log = logging.getLogger(__name__)

CHUNK = 1024  # source positions per chunk of a Milvus write
_RPC_BYTES = 16 << 20  # payload of one upsert / get


def auto_kind(kind: str, n: int) -> str:
    """The Milvus first stage of ``kind`` (``auto``: FLAT up to the file store's rule, IVF above)."""
    if kind != ann.AUTO:
        return kind
    return "flat" if ann.choose_kind(n) == "flat" else "ivf"


# ---------------------------------------------------------------------- collections
def create_collections(conn: MilvusConnection, name: str, m: MilvusManifest, dim: int, shards: int | None) -> None:
    """The collection(s) of a new gallery for vectors of width ``dim``; records the manifest."""
    dt = conn.DataType
    m["total_dim"] = int(dim)
    if dim > MAX_DIM:
        raise EslmatchError(f"vectors of width {dim} exceed Milvus's largest vector ({MAX_DIM})")
    pymilvus = require_pymilvus()
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("row", dt.INT64, is_primary=True)
    schema.add_field("item_id", dt.VARCHAR, max_length=MAX_ID_CHARS)
    schema.add_field("path", dt.VARCHAR, max_length=MAX_PATH_CHARS)
    if m["stages"] == 2:
        schema.add_field("length", dt.INT32)
    schema.add_field("vec", dt.FLOAT_VECTOR, dim=int(dim))
    params = conn.client.prepare_index_params()
    stored = ann.FaissOptions.from_dict(m["index"].get("options", {}))
    kind, build_params, _ = index_params(m["index"]["kind"], m["build"]["total"], stored)
    params.add_index(field_name="vec", index_type=kind, metric_type="IP", params=build_params)
    extra = {"num_shards": int(shards)} if shards else {}
    if m["stages"] == 2:
        _create_levels(conn, name + LEVELS_SUFFIX, m, dim, extra)
    conn.call(
        f"creating collection {name!r}",
        "create_collection",
        name,
        schema=schema,
        index_params=params,
        consistency_level="Strong",
        properties={"eslmatch.manifest": "{}"},
        **extra,
    )
    write_manifest(conn, name, m)


def _create_levels(conn: MilvusConnection, levels: str, m: MilvusManifest, dim: int, extra: dict[str, int]) -> None:
    chunk = max(1, min(m["width"], MAX_DIM // dim))
    pymilvus = require_pymilvus()
    dt = conn.DataType
    if conn.call("looking up the level collection", "has_collection", levels):
        conn.call(f"dropping the stale {levels!r}", "drop_collection", levels)
    for field_type in ["float16", "float32"] if m["dtype"] == "float16" else ["float32"]:
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", dt.INT64, is_primary=True)
        schema.add_field("row", dt.INT64)
        vtype = dt.FLOAT16_VECTOR if field_type == "float16" else dt.FLOAT_VECTOR
        schema.add_field("vec", vtype, dim=chunk * dim)
        params = conn.client.prepare_index_params()
        params.add_index(field_name="vec", index_type="FLAT", metric_type="IP")  # never searched
        try:
            conn.call(
                f"creating collection {levels!r}",
                "create_collection",
                levels,
                schema=schema,
                index_params=params,
                consistency_level="Strong",
                **extra,
            )
        except MilvusError as exc:
            if field_type == "float16" and "float16" in str(exc).lower():
                note(
                    log,
                    f"this Milvus has no FLOAT16_VECTOR: the float16 level features are stored in a "
                    f"FLOAT_VECTOR field of {levels!r} (same values, twice the bytes)",
                )
                continue
            raise
        m["levels"] = {"collection": levels, "chunk": chunk, "field": field_type}
        return


def collections_of(name: str, m: MilvusManifest) -> tuple[str, ...]:
    return (name, name + LEVELS_SUFFIX) if m["stages"] == 2 else (name,)


def present_rows(conn: MilvusConnection, name: str, start: int, stop: int) -> set[int]:
    """Rows in ``[start, stop)`` stored already (a scan of the primary keys)."""
    found: set[int] = set()
    for a in range(start, stop, MAX_TOPK):
        b = min(a + MAX_TOPK, stop)
        rows = conn.call(
            f"reading the stored rows of {name!r}",
            "query",
            name,
            filter=f"row >= {a} and row < {b}",
            output_fields=["row"],
            limit=b - a,
        )
        found.update(pk(r, "row") for r in rows)
    return found


def send(conn: MilvusConnection, name: str, entities: list[dict[str, Any]], row_bytes: int) -> None:
    step = max(1, _RPC_BYTES // max(1, row_bytes))
    for i in range(0, len(entities), step):
        part = entities[i : i + step]
        conn.call(f"writing items from row {part[0].get('row')} to {name!r}", "upsert", name, part)


def level_entities(
    m: MilvusManifest, rows: list[int], side: np.ndarray, lengths: np.ndarray
) -> tuple[list[dict[str, Any]], int]:
    """The level entities of items (``side (B, W, Dt)``), and their size in bytes each."""
    lv, total_dim = m["levels"], m["total_dim"]
    assert lv is not None and total_dim is not None  # set before the first item is written
    chunk, dt = int(lv["chunk"]), int(total_dim)
    store = np.float16 if lv["field"] == "float16" else np.float32
    out = []
    for j, row in enumerate(rows):
        n = int(lengths[j])
        for c in range(math.ceil(n / chunk)):
            block = np.zeros((chunk, dt), dtype=np.float32)
            part = side[j, c * chunk : min((c + 1) * chunk, n)]
            block[: part.shape[0]] = part
            if m["dtype"] == "float16":  # the precision asked, whatever the field
                block = block.astype(np.float16).astype(np.float32)
            out.append({"key": row * KEY_STRIDE + c, "row": row, "vec": block.reshape(-1).astype(store)})
    return out, chunk * dt * np.dtype(store).itemsize


# ---------------------------------------------------------------------- the sink
class MilvusSink:
    """The :class:`~eslmatch.retrieval.writer.Sink` of a Milvus gallery: source position ``p``
    becomes row ``start + p``; chunks of :data:`CHUNK` positions; rows stored already are skipped."""

    def __init__(
        self,
        conn: MilvusConnection,
        name: str,
        m: MilvusManifest,
        source: Source,
        start: int,
        exists: bool,
        shards: int | None,
        batch_size: int = 256,
    ) -> None:
        self.conn, self.name, self.m, self.source, self.start = conn, name, m, source, start
        self.exists, self.shards = exists, shards
        self._chunks = cut(source.count, batch_size * max(1, CHUNK // batch_size))  # whole batches
        self.present = present_rows(conn, name, start, start + source.count) if exists else set()
        self.metadata: list[Metadata] = source.metadata(range(source.count))
        self.added = now()

    def chunks(self) -> list[Chunk]:
        return self._chunks

    def done(self) -> set[int]:
        return {c.number for c in self._chunks if all(self.start + p in self.present for p in range(c.start, c.stop))}

    def todo(self, chunk: Chunk) -> list[int]:
        return [p for p in range(chunk.start, chunk.stop) if self.start + p not in self.present]

    @contextmanager
    def chunk(self, chunk: Chunk) -> Iterator[MilvusSink]:
        yield self

    def put(self, items: Encoded) -> None:
        if not self.exists:
            create_collections(self.conn, self.name, self.m, int(items.vectors.shape[1]), self.shards)
            load(self.conn, collections_of(self.name, self.m))
            self.exists = True
        rows = [self.start + p for p in items.positions]
        if self.m["stages"] == 2:
            assert items.side is not None and items.lengths is not None
            levels, size = level_entities(self.m, rows, items.side, items.lengths)
            send(self.conn, self.name + LEVELS_SUFFIX, levels, size)
        main = []
        for j, p in enumerate(items.positions):
            e: dict[str, Any] = {
                **{k: v for k, v in self.metadata[p].items() if v is not None},
                "added": self.added,
                "row": rows[j],
                "item_id": self.source.ids[p],
                "path": self.source.paths[p],
                "vec": items.vectors[j].astype(np.float32),
            }
            if self.m["stages"] == 2:
                assert items.lengths is not None
                e["length"] = int(items.lengths[j])
            main.append(e)
        send(self.conn, self.name, main, items.vectors.shape[1] * 4 + 512)
        self.present.update(rows)


# ---------------------------------------------------------------------- build, add
@dataclass
class MilvusWriteReport:
    """What a Milvus build or add did (``up_to_date``: the collection held it all already)."""

    collection: str
    total: int
    present: int
    written: int
    skipped: int
    count: int
    duplicates: int = 0
    up_to_date: bool = False

    def line(self, seconds: float) -> str:
        """What ``index build --milvus`` says of it, in one line."""
        if self.up_to_date:
            return f"collection {self.collection} already holds this gallery ({self.count} items): nothing to do"
        resumed = f", resumed: {self.present} were stored already" if self.present else ""
        return (
            f"built collection {self.collection}: wrote {counted(self.written, 'item')}{resumed} "
            f"({self.count} in all, {seconds:.1f} s)"
        )


def _check_source(source: Source) -> None:
    for i, p in enumerate(source.paths):
        if len(p) > MAX_PATH_CHARS:
            raise EslmatchError(f"path {i} is longer than {MAX_PATH_CHARS} characters (Milvus's VARCHAR limit)")
    for i, s in enumerate(source.ids):
        if len(s) > MAX_ID_CHARS:
            raise EslmatchError(f"id {i} is longer than {MAX_ID_CHARS} characters")
    if source.kind != "image":
        raise EslmatchError("--milvus holds image galleries (text -> image search); build caption indexes with --out")


def build_collection(
    model: MatchingModel,
    source: Source,
    conn: MilvusConnection,
    name: str,
    options: BuildOptions,
    record: ModelRecord,
    overwrite: bool = False,
    shards: int | None = None,
) -> MilvusWriteReport:
    """Build (or resume building) the gallery ``name`` of ``source``; see the module doc."""
    _check_source(source)
    kind = auto_kind(options.faiss_kind, source.count)
    index_params(kind, 1, options.faiss)
    signature = source.identity()["digest"]
    where = f"collection {name!r} at {conn.uri}"
    old = read_manifest(conn, name)
    if old is not None and not overwrite:
        check_model(old["model"], old["stages"], model, where)
        same = old["build"].get("signature") == signature and old["index"].get("kind") == kind
        if not same:
            raise EslmatchError(
                f"{where} already holds another gallery ({old['state']}); pass --overwrite to replace it, or add items "
                "with 'eslmatch index add'"
            )
        if old["state"] == "complete":
            return MilvusWriteReport(name, source.count, source.count, 0, 0, source.count, up_to_date=True)
    if old is not None and overwrite:
        for coll in (name, name + LEVELS_SUFFIX):
            if conn.call(f"looking up {coll!r}", "has_collection", coll):
                conn.call(f"dropping {coll!r}", "drop_collection", coll)
        old = None
    m = old or _new_manifest(model, source, record, kind, options, signature)
    if old is not None:
        load(conn, collections_of(name, m))
    sink = MilvusSink(conn, name, m, source, 0, old is not None, shards, options.batch_size)
    present = len(sink.present)
    out = _write(model, source, sink, options, where)
    if not sink.exists:
        first = f" (first: {out.skipped[0][0]}: {out.skipped[0][1]})" if out.skipped else ""
        raise EslmatchError(f"no readable image among the {source.count} files{first}")
    stored = len(sink.present)
    m["fields"] = merge_types(m.get("fields", {}), ({"id": source.ids[i], **md} for i, md in enumerate(sink.metadata)))
    m.update(
        {
            "state": "complete",
            "next_row": source.count,
            "modified": now(),
            "sources": [{**source.description, "count": stored, "encoding": _encoding(model, options, m).record()}],
        }
    )
    _flush(conn, name, m)
    return MilvusWriteReport(name, source.count, present, out.written, len(out.skipped), stored)


def _new_manifest(
    model: MatchingModel, source: Source, record: ModelRecord, kind: str, options: BuildOptions, signature: str
) -> MilvusManifest:
    milvus_kind, _, opts = index_params(kind, source.count, options.faiss)
    two = not model.exact_index
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": "image",
        "stages": 2 if two else 1,
        "state": "building",
        "created": now(),
        "eslmatch_version": __version__,
        "model": record,
        "encoding": encoding_of(model, options).record(),
        "total_dim": None,
        "width": int(getattr(source, "regions", 1)) if two else 1,
        "dtype": "float16" if options.side_dtype == "float16" and two else "float32",
        "grid": list(source.grid) if two and getattr(source, "grid", None) else None,  # type: ignore[attr-defined]
        "index": {
            "kind": kind,
            "auto": options.faiss_kind == ann.AUTO,
            "milvus": milvus_kind,
            "options": opts.to_dict(),
        },
        "levels": None,
        "build": {"id": uuid.uuid4().hex, "signature": signature, "total": source.count},
        "fields": {},
        "sources": [],
        "adding": None,
        "deleted": 0,
    }


def _write(model: MatchingModel, source: Source, sink: MilvusSink, options: BuildOptions, where: str) -> WriteReport:
    try:
        return write_source(
            model,
            source,
            sink,
            batch_size=options.batch_size,
            progress=options.progress,
            how=_encoding(model, options, sink.m),
        )
    except MilvusError as exc:
        stored = len(sink.present)
        raise MilvusError(
            f"{exc}; {stored} of {source.count} items are stored: run the same command again to resume"
        ) from exc


def _encoding(model: MatchingModel, options: BuildOptions, m: MilvusManifest) -> Encoding:
    """A build's encoding (a resumed one: its recorded one unless told), an add's (the
    gallery's unless told)."""
    return encoding_of(model, options, default_encoding(m.get("encoding"), model.device))


def _flush(conn: MilvusConnection, name: str, m: MilvusManifest) -> None:
    for coll in collections_of(name, m):
        conn.call(f"flushing {coll!r}", "flush", coll)
    write_manifest(conn, name, m)


def existing_ids(conn: MilvusConnection, name: str, ids: list[str]) -> dict[str, int]:
    """``{id: row}`` of the ids stored in the collection."""
    from ..filters import Filter, In, to_milvus

    out: dict[str, int] = {}
    for i in range(0, len(ids), 1000):
        part = ids[i : i + 1000]
        expr = to_milvus(Filter(In("id", tuple(part)), ""), lambda f: "item_id", lambda f: False)
        rows = conn.call(
            f"checking ids in {name!r}", "query", name, filter=expr, output_fields=["row", "item_id"], limit=len(part)
        )
        out.update({str(r["item_id"]): pk(r, "row") for r in rows})
    return out


def add_to_collection(
    model: MatchingModel,
    source: Source,
    conn: MilvusConnection,
    name: str,
    m: MilvusManifest,
    on_duplicate: str,
    options: BuildOptions,
) -> tuple[MilvusWriteReport, list[int]]:
    """Append ``source`` after the last row (an interrupted add of the same items resumes);
    returns the report and the rows of the items it replaces (``on_duplicate="replace"``),
    which the caller deletes."""
    _check_source(source)
    where = f"collection {name!r} at {conn.uri}"
    pending = m.get("adding")
    start = int(pending["start"]) if pending else int(m.get("next_row") or 0)
    source.number_from(start)
    found = existing_ids(conn, name, source.ids)
    if pending:
        found = {k: v for k, v in found.items() if v < start}  # its own rows, written before the kill
    if found and on_duplicate == "error":
        raise Conflict(f"{where}: id {next(iter(found))!r} is in the gallery already ({len(found)} of the new ids are)")
    duplicates = len(found)
    if found and on_duplicate == "skip":
        source = subset(source, [i for i, s in enumerate(source.ids) if s not in found])
    replaced = sorted(found.values()) if on_duplicate == "replace" else []
    signature = source.identity()["digest"]
    if pending and pending.get("signature") != signature:  # as the file store: another write drops it
        note(log, f"{where}: an interrupted add of other items ({pending.get('total')} from row {start}) is dropped")
        for coll in collections_of(name, m):
            conn.call(f"dropping an interrupted add from {coll!r}", "delete", coll, filter=f"row >= {start}")
        pending = m["adding"] = None
    if source.count == 0:
        return MilvusWriteReport(name, 0, 0, 0, 0, 0, duplicates=duplicates), []
    if not pending:
        m["adding"] = {"signature": signature, "start": start, "total": source.count}
        write_manifest(conn, name, m)
    sink = MilvusSink(conn, name, m, source, start, True, None, options.batch_size)
    present = len(sink.present)
    out = _write(model, source, sink, options, where)
    m["fields"] = merge_types(m.get("fields", {}), ({"id": source.ids[i], **md} for i, md in enumerate(sink.metadata)))
    m.update(
        {
            "adding": None,
            "next_row": start + source.count,
            "modified": now(),
            "sources": add_source(
                m.get("sources", []),
                {**source.description, "count": len(sink.present), "encoding": _encoding(model, options, m).record()},
            ),
        }
    )
    _flush(conn, name, m)
    rep = MilvusWriteReport(name, source.count, present, out.written, len(out.skipped), len(sink.present), duplicates)
    return rep, replaced
