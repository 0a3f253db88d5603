"""Writing shards: a staging folder that survives a kill, and the file store's sink.

A :class:`ShardWriter` writes shard ``i`` into ``shards/.NNNNN.tmp-PID`` of its staging
folder, syncs it, records it in ``shard.json`` (rows, width, the source positions it covers,
those skipped, the size and sha256 of each file) and renames it to ``shards/NNNNN``: a shard
exists complete or not at all. ``build.json`` names what is being written (``spec``) and the
writer's pid; a later writer with the same spec keeps every complete shard (completed in any
order, e.g. by the ranks of a torchrun job) and the caller writes the missing ones; one with
another spec starts anew. :class:`ShardSink` is the :class:`~eslmatch.retrieval.writer.Sink`
over a writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import EslmatchError
from ...utils import atomic_write_text, pid_alive
from ...utils.messages import note
from ..encoding import Encoded
from ..layout import (
    GLOBAL,
    LENGTHS,
    SCALE,
    SHARD_RECORD,
    SHARDS,
    SIDE,
    GalleryIndexError,
    ShardedArray,
    check_records,
    file_records,
    fsync_path,
    open_array,
    quantize_int8,
    shard_files,
    shard_name,
)
from ..records import BuildSpec, FileChecks, StagedShard, StagingRecord
from ..sources import CaptionSource, PhotoSource, RegionSource, Source
from ..writer import Chunk, cut

if TYPE_CHECKING:
    from ...model.base import MatchingModel

log = logging.getLogger(__name__)

BUILD_RECORD = "build.json"


class ShardArrays:
    """The arrays of one shard being written, filled in order by :meth:`put`; a one-stage
    shard holds only the vectors, whose width is learnt from the first items."""

    def __init__(self, folder: Path, capacity: int, width: int, dt: int | None, dtype: str, two_stage: bool) -> None:
        self.folder, self.capacity, self.width, self.dt, self.dtype = folder, capacity, width, dt, dtype
        self.two_stage, self.n = two_stage, 0
        self.positions: list[int] = []
        self.vectors: np.memmap | None = None
        self.side: np.memmap | None = None
        self.scale: np.memmap | None = None
        self.lengths: np.memmap | None = None

    def _alloc(self, dt: int) -> None:
        fmt, n = np.lib.format, self.capacity
        self.dt = dt
        self.vectors = fmt.open_memmap(self.folder / GLOBAL, mode="w+", dtype=np.float32, shape=(n, dt))
        if not self.two_stage:
            return
        side_dtype = np.int8 if self.dtype == "int8" else np.dtype(self.dtype)
        self.side = fmt.open_memmap(self.folder / SIDE, mode="w+", dtype=side_dtype, shape=(n, self.width, dt))
        self.lengths = fmt.open_memmap(self.folder / LENGTHS, mode="w+", dtype=np.int64, shape=(n,))
        if self.dtype == "int8":
            self.scale = fmt.open_memmap(self.folder / SCALE, mode="w+", dtype=np.float32, shape=(n, self.width))

    def put(self, items: Encoded) -> None:
        b = len(items.positions)
        if self.vectors is None:
            self._alloc(int(items.vectors.shape[1]))
        assert self.vectors is not None
        if items.vectors.shape[1] != self.dt:
            raise EslmatchError(
                f"the model gives vectors of width {items.vectors.shape[1]}, the gallery holds {self.dt}"
            )
        rows = slice(self.n, self.n + b)
        self.vectors[rows] = items.vectors
        if self.two_stage:
            assert items.side is not None and items.lengths is not None and self.side is not None
            w = items.side.shape[1]
            if w > self.width:
                raise EslmatchError(f"items of width {w} in a shard of width {self.width}")
            if self.scale is not None:
                q, scale = quantize_int8(items.side)
                self.side[rows, :w] = q
                self.scale[rows, :w] = scale
            else:
                self.side[rows, :w] = items.side.astype(self.side.dtype, copy=False)
            assert self.lengths is not None
            self.lengths[rows] = items.lengths
        self.positions += items.positions
        self.n += b

    def close(self) -> list[str]:
        """Flush (and cut to the rows written, when files were skipped); returns the file names."""
        arrays = {GLOBAL: self.vectors, SIDE: self.side, SCALE: self.scale, LENGTHS: self.lengths}
        cut_rows = {}
        for name, arr in arrays.items():
            if arr is not None:
                arr.flush()
                if self.n < self.capacity:  # photos were skipped: keep the rows written
                    cut_rows[name] = np.array(arr[: self.n])
        del arr
        arrays.clear()
        self.vectors = self.side = self.scale = self.lengths = None  # unmapped before rewriting
        for name, rows in cut_rows.items():
            np.save(self.folder / f"cut-{name}", rows, allow_pickle=False)
            os.replace(self.folder / f"cut-{name}", self.folder / name)
        return list(shard_files(self.two_stage, self.dtype))


class ShardWriter:
    """Shards written into ``staging`` resumably (see the module doc).

    ``attach=True``: the writer of a torchrun rank other than 0, in the folder rank 0's
    writer opened (nothing is cleaned or recorded; the folder must be visible here)."""

    def __init__(self, staging: Path, spec: BuildSpec, attach: bool = False) -> None:
        self.staging = staging
        self.spec: BuildSpec = json.loads(json.dumps(spec, default=str))  # as build.json holds it
        self.done: dict[int, StagedShard] = {}
        if attach:
            prior = self._prior()
            if prior is None or prior.get("spec") != self.spec:
                raise EslmatchError(
                    f"{staging / BUILD_RECORD} written by rank 0 is not visible here: --out must be in one folder "
                    "shared by every process (a shared filesystem for several nodes)"
                )
            return
        if staging.exists():
            prior = self._prior()
            pid = prior.get("pid") if prior else None
            if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                raise EslmatchError(f"{staging}: another eslmatch process (pid {pid}) is writing this gallery")
            if prior is not None and prior.get("spec") == self.spec:
                self.done = self._complete()
            else:
                if prior is not None:
                    note(log, f"discarding {staging}, an unfinished write of other inputs")
                shutil.rmtree(staging)
        (staging / SHARDS).mkdir(parents=True, exist_ok=True)
        record: StagingRecord = {"spec": self.spec, "pid": os.getpid()}
        atomic_write_text(staging / BUILD_RECORD, json.dumps(record, indent=2))

    @property
    def records(self) -> list[StagedShard]:
        return [self.done[i] for i in sorted(self.done)]

    def _prior(self) -> StagingRecord | None:
        """The ``build.json`` in the staging folder (``None``: none, or not a JSON object)."""
        try:
            prior: StagingRecord = json.loads((self.staging / BUILD_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return prior if isinstance(prior, dict) else None

    def _read(self, i: int) -> StagedShard | None:
        """The record of shard ``i`` if it is complete, else ``None``."""
        folder = self.staging / shard_name(i)
        try:
            rec = json.loads((folder / SHARD_RECORD).read_text(encoding="utf-8"))
            names = shard_files(self.spec["stages"] == 2, self.spec["dtype"]) if rec["rows"] else ()
            check_records(folder, rec["files"], names, False, folder / SHARD_RECORD, "shard")
            return {
                "dir": shard_name(i),
                "rows": rec["rows"],
                "width": rec["width"],
                "first": rec["first"],
                "count": rec["count"],
                "skipped": rec["skipped"],
                "files": rec["files"],
            }
        except (OSError, ValueError, KeyError, TypeError, GalleryIndexError):
            return None

    def _complete(self) -> dict[int, StagedShard]:
        """The complete shards already written; anything else in ``shards/`` is removed."""
        done: dict[int, StagedShard] = {}
        shards = self.staging / SHARDS
        for entry in sorted(shards.iterdir()) if shards.is_dir() else ():
            rec = self._read(int(entry.name)) if entry.name.isdigit() and entry.is_dir() else None
            if rec is None:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            else:
                done[int(entry.name)] = rec
        return done

    def collect(self, shards: Iterable[int]) -> list[int]:
        """Record those of ``shards`` other writers (ranks) completed; returns the missing ones."""
        missing = []
        for i in shards:
            if i not in self.done:
                rec = self._read(i)
                if rec is None:
                    missing.append(i)
                else:
                    self.done[i] = rec
        return missing

    @contextlib.contextmanager
    def shard(self, chunk: Chunk, width: int, dt: int | None) -> Iterator[ShardArrays]:
        """The arrays of shard ``chunk.number``; on success it is sealed and recorded."""
        i = chunk.number
        if i in self.done:
            raise AssertionError(f"shard {i} is complete already")
        tmp = self.staging / SHARDS / f".{i:05d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            arrays = ShardArrays(tmp, chunk.stop - chunk.start, width, dt, self.spec["dtype"], self.spec["stages"] == 2)
            yield arrays
            if arrays.n == 0:
                names: list[str] = []
                arrays.vectors = None
            else:
                names = arrays.close()
            kept = set(arrays.positions)
            skipped = [p for p in range(chunk.start, chunk.stop) if p not in kept]
            self._seal(tmp, i, arrays.n, width, chunk, skipped, file_records(tmp, names))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _seal(
        self, tmp: Path, i: int, rows: int, width: int, chunk: Chunk, skipped: list[int], files: FileChecks
    ) -> None:
        """Record shard ``i`` (``shard.json``: its rows, width, the positions of ``chunk`` and
        those ``skipped``, its ``files``) and move it into place."""
        for name in files:
            fsync_path(tmp / name)
        rec: StagedShard = {
            "dir": shard_name(i),
            "rows": rows,
            "width": width,
            "first": chunk.start,
            "count": chunk.stop - chunk.start,
            "skipped": skipped,
            "files": files,
        }
        on_disk = {k: v for k, v in rec.items() if k != "dir"}  # shard.json: where it is goes unsaid
        (tmp / SHARD_RECORD).write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        fsync_path(tmp / SHARD_RECORD)
        os.replace(tmp, self.staging / shard_name(i))
        fsync_path(self.staging / SHARDS)
        self.done[i] = rec

    def vectors(self) -> ShardedArray | None:
        """The vectors ``(N, K)`` of the complete non-empty shards, memory-mapped, in order."""
        parts = [open_array(self.staging / r["dir"] / GLOBAL) for r in self.records if r["rows"]]
        return ShardedArray(parts) if parts else None


def chunk_width(model: MatchingModel, source: Source, chunk: Chunk) -> int:
    """Positions per item of the chunk's shard: regions, the longest caption's tokens, or 1."""
    if model.exact_index:
        return 1
    if isinstance(source, RegionSource) or (isinstance(source, PhotoSource) and source.extractor is not None):
        return source.regions
    if isinstance(source, CaptionSource):
        from ..encode import tokenize_texts

        return max(int(t.numel()) for t in tokenize_texts(model, source.texts[chunk.start : chunk.stop]))
    raise EslmatchError(f"two-stage galleries are built from region features or captions, not {type(source).__name__}")


class ShardSink:
    """The file store's :class:`~eslmatch.retrieval.writer.Sink`: one shard per chunk of
    ``shard_rows`` positions, numbered from ``base``."""

    def __init__(self, writer: ShardWriter, model: MatchingModel, source: Source, shard_rows: int, base: int) -> None:
        self.writer, self.model, self.source = writer, model, source
        self._chunks = cut(source.count, shard_rows, base)
        self.dt = None if model.exact_index else int(model.config.total_dim)

    def chunks(self) -> list[Chunk]:
        return self._chunks

    def done(self) -> set[int]:
        return set(self.writer.done)

    def todo(self, chunk: Chunk) -> list[int]:
        return list(range(chunk.start, chunk.stop))

    def chunk(self, chunk: Chunk) -> contextlib.AbstractContextManager[ShardArrays]:
        return self.writer.shard(chunk, chunk_width(self.model, self.source, chunk), self.dt)

    def kept(self) -> list[int]:
        """Source positions stored, in row order (every chunk complete)."""
        out: list[int] = []
        for rec in self.writer.records:
            skipped = set(rec["skipped"])
            out += [p for p in range(rec["first"], rec["first"] + rec["count"]) if p not in skipped]
        return out

    def require_some(self) -> None:
        if not any(r["rows"] for r in self.writer.records):
            src = self.source
            first = ""
            if isinstance(src, PhotoSource) and src.refused:
                first = f" (first: {src.refused[0][0]}: {src.refused[0][1]})"
            raise EslmatchError(f"no readable image among the {src.count} files{first}")
