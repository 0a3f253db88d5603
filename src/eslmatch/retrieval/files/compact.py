"""Compaction and re-indexing of a file gallery (under its writer lock, one transaction each).

Compaction copies the live rows, in order, into new shards, rebuilds the FAISS first stage,
renumbers the rows in the catalogue and switches the layout in one transaction; the old files
are removed once nothing names them (a reader that still maps them keeps reading them).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...utils import atomic_dir
from .. import ann
from ..layout import (
    FAISS_DIR,
    GLOBAL,
    LENGTHS,
    MANIFEST,
    SCALE,
    SHARD_RECORD,
    SHARDS,
    SIDE,
    STAGING,
    UPLOADS,
    ShardedArray,
    check_target,
    file_records,
    fsync_path,
    link_or_copy,
    open_array,
    shard_files,
    shard_name,
)
from ..records import ShardFile, ShardRecord
from .catalog import CATALOG
from .commit import _COPY_BYTES, DEFAULT_SHARD_ROWS, _new_faiss, collect_garbage, write_lock
from .reader import FileReader, Shard


# ---------------------------------------------------------------------- compact, reindex
def compact_files(store: FileReader) -> dict[str, int]:
    """Drop deleted items and merge small shards: live rows are copied, in order, into new
    shards of ``shard_rows``; FAISS is rebuilt (``auto``: re-chosen); rows are renumbered; one
    transaction switches. Returns ``{"removed", "count", "shards"}``."""
    path = store.path
    with write_lock(path):
        store.refresh()
        layout = store.layout()
        with store.snapshot() as s:
            keep = s.live_rows() if s.deleted.size else np.arange(s.rows, dtype=np.int64)
            removed = int(s.deleted.size)
            shards = list(s.shards)
            dropped = [r.path for r in store.catalog.records(s.deleted.tolist()).values() if r.path]
        rows = int(store.manifest.get("shard_rows") or DEFAULT_SHARD_ROWS)
        full = all(sh.rows == rows for sh in shards[:-1])
        if not removed and full:
            collect_garbage(path, layout)
            return {"removed": 0, "count": int(keep.size), "shards": len(shards)}
        collect_garbage(path, layout)
        staging = path / STAGING
        (staging / SHARDS).mkdir(parents=True, exist_ok=True)
        base = int(layout.get("next_shard", len(shards)))
        new: list[ShardRecord] = []
        for j, a in enumerate(range(0, keep.size, rows)):
            new.append(_copy_shard(store, shards, keep[a : a + rows], staging, base + j))
        for rec in new:
            os.replace(staging / rec["dir"], path / rec["dir"])
        fsync_path(path / SHARDS)
        gen = store.catalog.generation() + 1
        vectors = ShardedArray([open_array(path / r["dir"] / GLOBAL) for r in new]) if new else None
        old_faiss = layout.get("faiss")
        kind = ann.AUTO if not old_faiss or old_faiss.get("auto", True) else str(old_faiss.get("kind"))
        opts = (
            None
            if kind == ann.AUTO or not old_faiss
            else ann.FaissOptions.from_dict({**old_faiss.get("options", {}), "nlist": None, "nprobe": None})
        )
        faiss_rec = _new_faiss(path, gen, vectors, kind, opts)
        del vectors
        new_layout = {
            **layout,
            "rows": int(keep.size),
            "shards": new,
            "next_shard": base + len(new),
            "faiss": faiss_rec,
        }
        with store.catalog.write():
            store.catalog.renumber(keep)
            store.catalog.set_layout(new_layout)
        store.catalog.checkpoint()
        collect_garbage(path, new_layout)
        shutil.rmtree(staging, ignore_errors=True)
        _drop_uploads(store, dropped)
        return {"removed": removed, "count": int(keep.size), "shards": len(new)}


def _drop_uploads(store: FileReader, paths: Sequence[str]) -> None:
    """Remove the photos uploaded into the gallery folder (``serve``'s ``POST /items``) that
    only the compacted-away items named: an upload goes with its item."""
    uploads = (store.path / UPLOADS).resolve()
    mine = {Path(p).resolve() for p in paths if Path(p).resolve().parent == uploads}
    if not mine:
        return
    live = {Path(p).resolve() for p in store.catalog.column_values("path") if p}
    for f in mine - live:
        f.unlink(missing_ok=True)


def _copy_shard(
    store: FileReader, shards: Sequence[Shard], rows: np.ndarray, staging: Path, number: int
) -> ShardRecord:
    """A new shard in ``staging`` holding the stored ``rows`` (sorted), copied as stored."""
    folder = staging / shard_name(number)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    first = np.asarray([sh.first for sh in shards], dtype=np.int64)
    which = np.searchsorted(first, rows, side="right") - 1
    width = max(int(shards[int(k)].width) for k in np.unique(which))
    names = shard_files(store.two_stage, store.dtype)
    parts = {GLOBAL: "vectors", SIDE: "side", SCALE: "scale", LENGTHS: "lengths"}
    for name in names:
        sample = getattr(shards[int(which[0])], parts[name])
        shape: tuple[int, ...] = (rows.size, *sample.shape[1:])
        if name in (SIDE, SCALE):
            shape = (rows.size, width, *sample.shape[2:])
        out = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=sample.dtype, shape=shape)
        step = max(1, _COPY_BYTES // max(1, int(np.prod(shape[1:])) * sample.dtype.itemsize))
        for a in range(0, rows.size, step):
            sel = slice(a, min(rows.size, a + step))
            for k in np.unique(which[sel]):
                sh = shards[int(k)]
                mask = which[sel] == k
                local = rows[sel][mask] - sh.first
                src = getattr(sh, parts[name])
                idx = np.nonzero(mask)[0] + a
                if name in (SIDE, SCALE):
                    out[idx, : sh.width] = src[local]
                else:
                    out[idx] = src[local]
        out.flush()
        del out
        fsync_path(tmp / name)
    rec: ShardFile = {"rows": int(rows.size), "width": width, "files": file_records(tmp, names)}
    (tmp / SHARD_RECORD).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder)
    return {"dir": shard_name(number), **rec}


def reindex_files(store: FileReader, kind: str, options: ann.FaissOptions | None) -> dict[str, Any]:
    """Rebuild only the FAISS first stage (e.g. ``flat`` -> ``hnsw``) over every stored row."""
    ann.check_kind(kind, auto=True)
    path = store.path
    with write_lock(path):
        store.refresh()
        layout = store.layout()
        collect_garbage(path, layout)
        gen = store.catalog.generation() + 1
        vectors = (
            ShardedArray([open_array(path / r["dir"] / GLOBAL) for r in layout["shards"]]) if layout["shards"] else None
        )
        store.advise(random_access=False)
        faiss_rec = _new_faiss(path, gen, vectors, kind, options)
        del vectors
        with store.catalog.write():
            store.catalog.set_layout({**layout, "faiss": faiss_rec})
        collect_garbage(path, {**layout, "faiss": faiss_rec})
        return dict(faiss_rec) if faiss_rec else {}


def copy_gallery(src: Path, dst: Path) -> Path:
    """A copy of the gallery at ``src`` at ``dst`` (atomic): its files hard-linked (copied across
    file systems), its catalogue copied with SQLite's backup (a consistent snapshot)."""
    check_target(dst)
    reader = FileReader.open(src)
    with write_lock(src), atomic_dir(dst) as tmp:
        layout = reader.layout()
        for rec in layout.get("shards", []):
            (tmp / rec["dir"]).mkdir(parents=True)
            for name in [*rec["files"], SHARD_RECORD]:
                if (src / rec["dir"] / name).is_file():
                    link_or_copy(src / rec["dir"] / name, tmp / rec["dir"] / name)
        faiss_rec = layout.get("faiss")
        faiss = faiss_rec.get("file") if faiss_rec else None
        if faiss:
            (tmp / FAISS_DIR).mkdir()
            link_or_copy(src / faiss, tmp / faiss)
        link_or_copy(src / MANIFEST, tmp / MANIFEST)
        out = sqlite3.connect(tmp / CATALOG)
        try:
            reader.catalog.conn.backup(out)
        finally:
            out.close()
    reader.close()
    return dst
