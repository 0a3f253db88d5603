"""The on-disk layout of a file gallery: names, manifest, checksums, memory-mapped shards.

A file gallery is a folder (see ``docs/retrieval.md``)::

    manifest.json      what the gallery is, written once: format, version 4, kind, stages, the
                       model record (path, fingerprint, weights digest), total_dim, the side's
                       dtype, region grid, shard size
    catalog.sqlite     what changes: items (ids, rows, paths, deleted flags, metadata), field
                       types, the generation, and the layout: the shards and the FAISS file in
                       use, with the size + sha256 of each file (see :mod:`.catalog`)
    shards/NNNNN/      immutable arrays of consecutive rows: global.npy (N, Dt) float32 index
                       vectors, and for a two-stage gallery side.npy (N, R, Dt) engine-ready
                       sides (float32 / float16 / int8 + scale.npy (N, R)), lengths.npy (N,);
                       shard.json records its rows, width and checksums
    faiss/GGGGGG.index the FAISS first stage over rows [0, faiss rows), named by the generation
                       that wrote it (rows after it are searched exactly)
    .lock              writers take an exclusive lock on it (readers never lock)
    .staging/          work of an unfinished operation (a resumable add, a compaction)

Files are never changed in place: an operation writes new files, then one catalogue
transaction switches to them; files no committed layout names are removed by the next writer.
Indexes of format versions 1-3 (one folder of arrays, ids.txt and paths.txt) are upgraded to
version 4 by hard links (:mod:`.upgrade`).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, cast

import numpy as np
import numpy.typing as npt

from ..errors import EslmatchError
from ..utils.digest import sha256_stream
from ..utils.io import check_replaceable, fsync_path
from .records import FileCheck, FileChecks, Manifest

FORMAT = "eslmatch-gallery-index"
VERSION = 4
KINDS = ("image", "caption")
SIDE_DTYPES = ("float32", "float16", "int8")

MANIFEST = "manifest.json"
SIDE = "side.npy"
LENGTHS = "lengths.npy"
GLOBAL = "global.npy"
SCALE = "scale.npy"
SHARDS = "shards"
SHARD_RECORD = "shard.json"
FAISS_DIR = "faiss"
LOCK = ".lock"
STAGING = ".staging"
UPLOADS = "uploads"  # photos added through eslmatch serve (POST /items), named by content


class GalleryIndexError(EslmatchError):
    """A gallery index that is damaged, of an unknown version, or built by another model."""


def shard_files(two_stage: bool, dtype: str) -> tuple[str, ...]:
    """The array files of one shard (a one-stage gallery stores only the vectors)."""
    if not two_stage:
        return (GLOBAL,)
    return (SIDE, SCALE, LENGTHS, GLOBAL) if dtype == "int8" else (SIDE, LENGTHS, GLOBAL)


def shard_name(i: int) -> str:
    """``shards/00007``: the folder of shard number ``i`` (relative to the gallery)."""
    return f"{SHARDS}/{i:05d}"


def faiss_name(generation: int) -> str:
    return f"{FAISS_DIR}/{generation:06d}.index"


def write_json(path: Path, data: Mapping[str, object]) -> None:
    """Write the JSON object ``data`` to ``path`` (a temporary name, synced, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (of any shape: the caller checks its keys)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GalleryIndexError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GalleryIndexError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GalleryIndexError(f"{path}: not a JSON object ({what})")
    return data


def read_manifest(path: Path) -> Manifest:
    """The manifest of a version 4 gallery folder, checked."""
    if not path.exists():
        raise GalleryIndexError(f"{path}: no such index directory")
    if not path.is_dir():
        raise GalleryIndexError(f"{path}: an index is a directory (built by 'eslmatch index build')")
    m = read_json(path / MANIFEST, "not an eslmatch gallery index, or a damaged one")
    if m.get("format") != FORMAT:
        raise GalleryIndexError(f"{path / MANIFEST}: not an eslmatch gallery index manifest (format != {FORMAT!r})")
    if m.get("version") != VERSION:
        raise GalleryIndexError(
            f"{path / MANIFEST}: index format version {m.get('version')!r} is not supported by this eslmatch "
            f"(supported: {VERSION}, and 1-3 by upgrading); rebuild the index"
        )
    for key, typ in (("kind", str), ("stages", int), ("total_dim", int), ("dtype", str), ("model", dict)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise GalleryIndexError(f"{path / MANIFEST}: missing or invalid {key!r}")
    if m["kind"] not in KINDS or m["stages"] not in (1, 2) or m["dtype"] not in SIDE_DTYPES or m["total_dim"] < 1:
        raise GalleryIndexError(f"{path / MANIFEST}: kind, stages, dtype or total_dim out of range")
    grid = m.get("grid")
    if grid is not None and not (
        isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
    ):
        raise GalleryIndexError(f"{path / MANIFEST}: grid must be null or [h, w], got {grid!r}")
    return cast(Manifest, m)  # the JSON object whose keys were checked above


# ---------------------------------------------------------------------- checksums


def file_records(directory: Path, names: Iterable[str]) -> FileChecks:
    """``{name: {"bytes", "sha256"}}`` of files in ``directory``."""
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_stream(directory / n)} for n in names}


def check_records(
    directory: Path,
    records: Mapping[str, FileCheck],
    names: Iterable[str],
    verify: bool,
    manifest_path: Path,
    where: str = "index",
    prefix: str = "",
) -> None:
    """Each of ``names`` exists in ``directory`` with the size recorded in ``records`` (and
    its sha256 when ``verify``); failures are one line naming the file (``prefix``: the
    folder of ``directory`` in the index, for messages). ``records`` was read from disk: a
    damaged one (not an object, a check missing) is refused too."""
    for name in names:
        path = directory / name
        rec = records.get(name) if isinstance(records, dict) else None
        if not isinstance(rec, dict) or "bytes" not in rec or "sha256" not in rec:
            label = f"{prefix}/{name}" if prefix else name
            raise GalleryIndexError(f"{manifest_path}: no size/checksum recorded for {label}")
        if not path.is_file():
            raise GalleryIndexError(f"{path}: missing file of the {where} (rebuild it with 'eslmatch index build')")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise GalleryIndexError(
                f"{path}: {size} bytes, {manifest_path.name} records {rec['bytes']} (truncated or modified)"
            )
        if verify and sha256_stream(path) != rec["sha256"]:
            raise GalleryIndexError(f"{path}: sha256 differs from the manifest (the file was modified or corrupted)")


def open_array(path: Path, random_access: bool = False) -> np.ndarray:
    """Memory-map an ``.npy`` file (no pickles); failures name the file.

    ``random_access``: tell the kernel the rows will be read in no order (see :func:`advise`).
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryIndexError(f"{path}: not a readable .npy array ({exc})") from exc
    if random_access:
        advise(arr, True)
    return arr


def read_rows(arr: Rows, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` read with ``pread`` instead of through the memory map: nothing is mapped
    into the process (a fault maps a whole page-cache folio, up to hundreds of KB, for a row of
    2 KB), for many small scattered rows. ``arr``: a memory map from :func:`open_array` or a
    :class:`ShardedArray` of them (anything else is indexed as usual); ``rows``: row numbers."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if isinstance(arr, ShardedArray):
        out = np.empty((rows.size, *arr.shape[1:]), dtype=arr.dtype)
        which = np.searchsorted(arr.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = read_rows(arr.parts[int(s)], rows[sel] - int(arr.offsets[s]))
        return out
    filename = getattr(arr, "filename", None)
    if not isinstance(arr, np.memmap) or filename is None or not arr.flags.c_contiguous or not hasattr(os, "preadv"):
        return np.asarray(arr[rows])
    out = np.empty((rows.size, *arr.shape[1:]), dtype=arr.dtype)
    row_bytes = int(arr.strides[0]) if arr.ndim > 1 else arr.itemsize
    view = out.data.cast("B")
    fd = os.open(filename, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            got = os.preadv(fd, [view[i * row_bytes : (i + 1) * row_bytes]], int(arr.offset) + r * row_bytes)
            if got != row_bytes:
                raise GalleryIndexError(f"{filename}: row {r} could not be read whole (the file is truncated)")
    finally:
        os.close(fd)
    return out


def prefetch(arr: Rows, rows: np.ndarray) -> None:
    """Ask the kernel to read ``rows`` of the memory-mapped ``arr`` (an ``np.memmap`` of rows
    or a :class:`ShardedArray` of them) now, all at once (``MADV_WILLNEED`` on each row's bytes),
    instead of one page fault (one 4 KB read) at a time when they are copied. ``rows``: sorted
    row numbers. A no-op where the platform has no ``madvise``."""
    if isinstance(arr, ShardedArray):
        which = np.searchsorted(arr.offsets, rows, side="right") - 1
        for s in np.unique(which):
            prefetch(arr.parts[int(s)], rows[which == s] - int(arr.offsets[s]))
        return
    mapping = getattr(arr, "_mmap", None)
    flag = getattr(mmap, "MADV_WILLNEED", None)
    if mapping is None or flag is None or not hasattr(mapping, "madvise") or not len(rows):
        return
    row_bytes = int(arr.strides[0]) if arr.ndim else 0
    base = int(getattr(arr, "offset", 0)) % mmap.ALLOCATIONGRANULARITY  # where the data starts in the map
    page = mmap.PAGESIZE
    size = len(mapping)
    try:
        for r in np.asarray(rows, dtype=np.int64):
            start = base + int(r) * row_bytes
            lo = start - start % page
            mapping.madvise(flag, lo, min(size, start + row_bytes) - lo)
    except (OSError, ValueError):
        pass


def release(arr: Rows) -> None:
    """Drop the pages of the memory map(s) behind ``arr`` from this process (``MADV_DONTNEED``
    on a read-only file mapping: they stay in the page cache, and the next read of them is a
    cheap minor fault). Bounds the resident memory of a process that reads scattered rows."""
    _madvise(arr, "MADV_DONTNEED")


def advise(arr: Rows, random_access: bool) -> None:
    """``madvise`` the memory map(s) behind ``arr`` (an ``np.memmap`` or a :class:`ShardedArray`):
    ``MADV_RANDOM`` (no read-ahead: a query that reads 100 scattered rows of 24 KB reads about
    that much, not ~100 x the kernel's read-ahead window) or ``MADV_NORMAL`` (read-ahead, for
    scans). A no-op where the platform has no ``madvise``."""
    _madvise(arr, "MADV_RANDOM" if random_access else "MADV_NORMAL")


def _madvise(arr: Rows, name: str) -> None:
    """``madvise(mmap.<name>)`` on every memory map behind ``arr``; a no-op without one."""
    if isinstance(arr, ShardedArray):
        for part in arr.parts:
            _madvise(part, name)
        return
    mapping = getattr(arr, "_mmap", None)
    flag = getattr(mmap, name, None)
    if mapping is None or flag is None or not hasattr(mapping, "madvise"):
        return
    try:
        mapping.madvise(flag)
    except (OSError, ValueError):
        pass


def check_target(out: Path) -> None:
    """Refuse to replace anything but an existing index (or an empty directory)."""
    check_replaceable(out, MANIFEST, "a gallery")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------- sharded arrays
Index = Union[int, np.integer, slice, np.ndarray]  # one axis of ShardedArray[...]


class ShardedArray:
    """The rows of several arrays (the memory-mapped shards of a version 3 index, same
    trailing shape and dtype) read as one ``(N, ...)`` array; reading copies only the rows asked.

    Supports what the index reads: ``a[i]``, ``a[i0:i1]`` (step 1), ``a[rows]`` (an integer
    array, any order), each optionally followed by indices of the other axes
    (``a[rows, :w]``), ``len(a)``, ``.shape``, ``.dtype`` and ``np.asarray(a)`` (reads all).
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("a ShardedArray needs at least one part")
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(int(p.shape[0]) for p in self.parts)])
        self.shape: tuple[int, ...] = (int(self.offsets[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def _tail(self, rest: tuple[Index, ...]) -> tuple[int, ...]:
        index = (slice(None), *rest)
        return tuple(np.empty((0, *self.shape[1:]), dtype=np.uint8)[index].shape[1:])

    def __getitem__(self, index: Index | tuple[Index, ...]) -> np.ndarray:
        key, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        n = self.shape[0]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            index = (i - int(self.offsets[s]), *rest)
            return self.parts[s][index]
        if isinstance(key, slice):
            i0, i1, step = key.indices(n)
            if step != 1:
                raise IndexError("a ShardedArray is sliced with step 1 only")
            pieces = []
            for s, part in enumerate(self.parts):
                o0, o1 = int(self.offsets[s]), int(self.offsets[s + 1])
                lo, hi = max(i0, o0), min(i1, o1)
                if lo < hi:
                    index = (slice(lo - o0, hi - o0), *rest)
                    pieces.append(part[index])
            if not pieces:
                return np.empty((0, *self._tail(rest)), dtype=self.dtype)
            return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows out of range for {n} rows")
        out = np.empty((rows.size, *self._tail(rest)), dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            index = (rows[sel] - int(self.offsets[s]), *rest)
            out[sel] = self.parts[int(s)][index]
        return out

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype, copy=False)


Rows = Union[np.ndarray, ShardedArray]  # an array of rows: a memory map, or the shards' maps as one


# ---------------------------------------------------------------------- int8 side
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x (..., Dt)`` float -> ``(q (..., Dt) int8, scale (...) float32)`` with
    ``x ~= q * scale``: symmetric, one scale per vector (``max |x| / 127``; 0 for a zero vector,
    e.g. padding). The rounding error of each value is at most ``scale / 2``."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q (..., Dt) int8`` and ``scale (...)`` -> float32 ``(..., Dt)``."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


class RowReader:
    """``reader[rows]``: rows of an on-disk array read with ``pread`` (:func:`read_rows`)."""

    def __init__(self, arr: Rows) -> None:
        self.arr = arr

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return read_rows(self.arr, rows)


def file_resident() -> int | None:
    """Bytes of file-backed memory resident in this process (``/proc/self/statm``), or ``None``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * 4096
    except (OSError, ValueError, IndexError):
        return None
