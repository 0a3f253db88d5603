"""The file store's writes: build, add, delete, update, compact, reindex. Each is atomic.

A build writes a whole gallery into a staging folder beside it (``.NAME.building``, kept when
killed so the same build resumes after its complete shards; under torchrun the ranks share
it) and renames it into place (a journal makes the replacement of an existing gallery
recoverable: :func:`eslmatch.utils.io.recover_replace`).

The other operations change a gallery in place, under an exclusive lock (``.lock``; readers
never lock): new files are written under new names (an add's shards resumably in
``.staging``), then ONE catalogue transaction switches the layout and the items; the files no
committed layout names are removed afterwards and by the next writer (what a killed operation
left). A kill at any moment leaves the gallery as it was before or after the operation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...errors import Conflict, EslmatchError, JobFailed
from ...utils import replace_dir
from ...utils.messages import note
from ..encoding import FP32, Encoding, default_encoding
from ..filters import Filter
from ..layout import (
    FORMAT,
    GLOBAL,
    MANIFEST,
    SHARDS,
    STAGING,
    VERSION,
    ShardedArray,
    check_target,
    fsync_path,
    open_array,
    shard_name,
    write_json,
)
from ..metadata import Metadata, merge_types, now
from ..policy import add_source, check_known, check_on_duplicate
from ..records import Layout, LibraryState, ModelRecord
from ..sources import Source
from ..writer import write_source
from .catalog import CATALOG, Catalog
from .commit import (
    DEFAULT_SHARD_ROWS,
    AddReport,
    BuildOptions,
    _commit_items,
    _digest,
    _grown_faiss,
    _layout_shard,
    _new_faiss,
    _side_dtype,
    _source_record,
    _spec,
    collect_garbage,
    encoding_of,
    write_lock,
)
from .compact import compact_files, reindex_files
from .reader import FileReader
from .shards import BUILD_RECORD, ShardSink, ShardWriter

if TYPE_CHECKING:
    from ...distributed import DistContext
    from ...model.base import MatchingModel
    from .. import ann

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- build
def build_files(
    model: MatchingModel,
    source: Source,
    out: Path,
    options: BuildOptions,
    record: ModelRecord,
    job: DistContext,
    library: LibraryState | None = None,
) -> Path:
    """A new file gallery at ``out`` (replacing a gallery there), resumable, by one process or
    by the ranks of ``job`` together, its ``library`` state (``library.py``) written with its
    items. Every stage is agreed by every rank (:meth:`DistContext.stage`)."""
    with job.stage("setup"):
        options.check()
        check_target(out)
        dtype = _side_dtype(model, options, source.count)
        rows = options.shard_rows or DEFAULT_SHARD_ROWS
        how = encoding_of(model, options)
        spec = _spec(model, source, record, dtype, rows, action="build", encoding=how.record())
    with job.stage("setup"):
        digests = job.gather(_digest(spec))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise EslmatchError(
                f"rank {differ[0]} sees other inputs than rank 0 (model, features, ids, paths or options differ): "
                "every process must read the same files"
            )
    staging = out.with_name(f".{out.name}.building")
    writer: ShardWriter | None = None
    with job.stage("resume"):
        if job.is_main:
            writer = ShardWriter(staging, spec)
            if writer.done:
                total = math.ceil(source.count / rows)
                log.info(f"resuming the build of {out}: {len(writer.done)} complete shards of {total} kept")
    done = job.broadcast(writer.done if writer is not None else None)  # every rank deals the same pending shards
    with job.stage("resume"):
        if not job.is_main:
            writer = ShardWriter(staging, spec, attach=True)
            writer.done = dict(done or {})
    assert writer is not None
    sink = ShardSink(writer, model, source, rows, 0)
    try:
        with job.stage("encode"):
            write_source(
                model,
                source,
                sink,
                batch_size=options.batch_size,
                progress=options.progress and job.is_main,
                job=job,
                how=how,
            )
    except BaseException as exc:
        if job.is_main:
            writer.collect(c.number for c in sink.chunks())
            if any(r["rows"] for r in writer.records):
                note(log, f"{len(writer.done)} complete shards kept in {staging}: build again to resume")
            else:
                shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, JobFailed):
            job.gather(None)  # every rank is here: the others wait for rank 0's note
        raise
    with job.stage("write"):
        if job.is_main:
            try:
                sink.require_some()
            except EslmatchError:
                shutil.rmtree(staging, ignore_errors=True)  # nothing worth resuming
                raise
            _finish_build(model, source, sink, out, staging, options, record, dtype, rows, how, library)
    return out


def _finish_build(
    model: MatchingModel,
    source: Source,
    sink: ShardSink,
    out: Path,
    staging: Path,
    options: BuildOptions,
    record: ModelRecord,
    dtype: str,
    shard_rows: int,
    how: Encoding = FP32,
    library: LibraryState | None = None,
) -> None:
    """Rank 0 (or the one process) once every shard is written: FAISS, catalogue, manifest,
    then the staging folder replaces ``out``."""
    writer = sink.writer
    missing = writer.collect(c.number for c in sink.chunks())
    if missing:
        raise EslmatchError(
            f"{len(missing)} shard(s) reported written are missing from {staging} (first: {shard_name(missing[0])}): "
            "--out must be in one folder shared by every process"
        )
    sink.require_some()
    vectors = writer.vectors()
    assert vectors is not None
    first = _first_stage_grid(model, source)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": source.kind,
        "stages": record["stages"],
        "created": now(),
        "eslmatch_version": __version__,
        "model": record,
        "encoding": how.record(),
        "total_dim": int(vectors.shape[1]),
        "dtype": dtype,
        "grid": first,
        "shard_rows": shard_rows,
    }
    catalog = Catalog(staging / CATALOG, create=True)
    faiss_rec = _new_faiss(staging, 1, vectors, options.faiss_kind, options.faiss)
    del vectors
    kept = sink.kept()
    layout: Layout = {
        "rows": len(kept),
        "shards": [_layout_shard(r) for r in writer.records if r["rows"]],
        "next_shard": len(sink.chunks()),
        "numbered": source.count,
        "faiss": faiss_rec,
        "sources": [_source_record(source, len(kept), sink, how)],
    }
    _commit_items(catalog, source, kept, 0, layout)
    if library:
        with catalog.write():
            catalog.set_state("library", library)
    catalog.checkpoint()
    catalog.close()
    write_json(staging / MANIFEST, manifest)
    (staging / BUILD_RECORD).unlink(missing_ok=True)
    fsync_path(staging)
    check_target(out)
    replace_dir(staging, out)


def _first_stage_grid(model: MatchingModel, source: Source) -> list[int] | None:
    grid = getattr(source, "grid", None)
    return list(grid) if grid and not model.exact_index else None


# ---------------------------------------------------------------------- add
def add_files(
    store: FileReader,
    model: MatchingModel,
    source: Source,
    on_duplicate: str,
    options: BuildOptions,
    record: ModelRecord,
) -> AddReport:
    """Append ``source`` to the gallery (see the module doc); ``on_duplicate``: what to do
    with an id the gallery holds (``skip`` it, ``replace`` the stored item, or ``error``)."""
    check_on_duplicate(on_duplicate)
    path = store.path
    with write_lock(path):
        store.refresh()
        layout = store.layout()
        source.number_from(int(layout.get("numbered", layout["rows"])))
        with store.snapshot():
            existing = store.catalog.rows_of(source.ids)
        rep = AddReport(duplicates=len(existing))
        if existing and on_duplicate == "error":
            first = next(i for i in source.ids if i in existing)
            raise Conflict(f"{path}: id {first!r} is in the gallery already ({len(existing)} of the new ids are)")
        if existing and on_duplicate == "skip":
            source = _without(source, existing)
        replaced = sorted(existing.values()) if on_duplicate == "replace" else []
        if source.count == 0:
            collect_garbage(path, layout)
            rep.count = store.info()["count"]
            return rep
        rows = int(store.manifest.get("shard_rows") or DEFAULT_SHARD_ROWS)
        base = int(layout.get("next_shard", len(layout["shards"])))
        how = encoding_of(model, options, default_encoding(store.manifest.get("encoding"), model.device))
        spec = _spec(
            model, source, record, store.dtype, rows, action="add", base=base, replace=replaced, encoding=how.record()
        )
        collect_garbage(path, layout, keep_staging=spec)
        writer = ShardWriter(path / STAGING, spec)
        if writer.done:
            log.info(f"resuming the add to {path}: {len(writer.done)} complete shards kept")
        sink = ShardSink(writer, model, source, rows, base)
        result = write_source(model, source, sink, batch_size=options.batch_size, progress=options.progress, how=how)
        rep.unreadable = result.skipped
        new = [r for r in writer.records if r["rows"]]
        if not new:  # every new file was unreadable: nothing to add (each was named)
            collect_garbage(path, layout)
            rep.count = store.info()["count"]
            return rep
        for rec in new:
            os.replace(path / STAGING / rec["dir"], path / rec["dir"])
        fsync_path(path / SHARDS)
        shards = [*layout["shards"], *(_layout_shard(r) for r in new)]
        kept = sink.kept()
        start = int(layout["rows"])
        gen = store.catalog.generation() + 1
        vectors = ShardedArray([open_array(path / r["dir"] / GLOBAL) for r in shards])
        faiss_rec = _grown_faiss(path, gen, layout.get("faiss"), vectors)
        del vectors
        new_layout: Layout = {
            **layout,
            "rows": start + len(kept),
            "shards": shards,
            "next_shard": base + len(sink.chunks()),
            "numbered": int(layout.get("numbered", start)) + source.count,
            "faiss": faiss_rec,
            "sources": add_source(layout.get("sources", []), _source_record(source, len(kept), sink, how)),
        }
        _commit_items(store.catalog, source, kept, start, new_layout, replaced)
        collect_garbage(path, new_layout)
        rep.added, rep.replaced = len(kept), len(replaced)
        rep.count = store.info()["count"]
        return rep


def _without(source: Source, ids: Mapping[str, int]) -> Source:
    """The source without the items whose ids are in ``ids``."""
    from ..sources import subset

    return subset(source, [i for i, s in enumerate(source.ids) if s not in ids])


# ---------------------------------------------------------------------- delete, update
def delete_files(store: FileReader, ids: Sequence[str] | None, where: Filter | None) -> int:
    """Mark items deleted (by id and / or filter) in one transaction; unknown ids are an error."""
    with write_lock(store.path):
        store.refresh()
        rows: set[int] = set()
        if ids:
            found = store.catalog.rows_of(list(ids))
            check_known(store.where, ids, found, "deleted")
            rows.update(found.values())
        if where is not None:
            rows.update(store.match(where).tolist())
        if not rows:
            return 0
        with store.catalog.write():
            n = store.catalog.mark_deleted(sorted(rows))
        collect_garbage(store.path, store.layout())
        return n


def update_files(
    store: FileReader,
    changes: Mapping[str, Metadata],
    paths: Mapping[str, str] | None = None,
    library: LibraryState | None = None,
    restore: Sequence[str] = (),
) -> int:
    """Bring the deleted items ``restore`` back (those not compacted yet; the changes of
    the others are dropped), then set metadata of live items (``None`` clears a field), the
    ``paths`` of moved ones and the photo ``library``'s state (:mod:`~.library`), in one
    transaction; an unknown id or a value of another type than its field's is an error, and
    nothing changes."""
    paths = paths or {}
    with write_lock(store.path):
        store.refresh()
        with store.catalog.write():
            store.catalog.revive(restore)
            ids = list({**changes, **paths})
            found = store.catalog.rows_of(ids)
            ids = [i for i in ids if i in found or i not in restore]
            check_known(store.where, ids, found, "updated")
            types = merge_types(store.catalog.types(), ({"id": k, **changes.get(k, {})} for k in ids))
            rows = {found[k]: {**changes.get(k, {}), **({"path": paths[k]} if k in paths else {})} for k in ids}
            store.catalog.add_fields(types)
            store.catalog.update(rows)
            if library is not None:
                store.catalog.set_state("library", library)
        collect_garbage(store.path, store.layout())
        return len(ids)


class FileStore(FileReader):
    """A file gallery: :class:`FileReader` plus the collection operations (each atomic)."""

    def add(
        self,
        model: MatchingModel,
        source: Source,
        record: ModelRecord,
        on_duplicate: str = "skip",
        options: BuildOptions | None = None,
    ) -> AddReport:
        return add_files(self, model, source, on_duplicate, options or BuildOptions(), record)

    def delete(self, ids: Sequence[str] | None = None, where: Filter | None = None) -> int:
        return delete_files(self, ids, where)

    def update(
        self,
        changes: Mapping[str, Metadata],
        paths: Mapping[str, str] | None = None,
        library: LibraryState | None = None,
        restore: Sequence[str] = (),
    ) -> int:
        return update_files(self, changes, paths, library, restore)

    def compact(self) -> dict[str, int]:
        return compact_files(self)

    def reindex(self, kind: str, options: ann.FaissOptions | None = None) -> dict[str, Any]:
        return reindex_files(self, kind, options)


__all__ = ["AddReport", "BuildOptions", "FileStore", "add_files", "build_files", "delete_files", "update_files"]
