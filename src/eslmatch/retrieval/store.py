"""The on-disk gallery index: file names, manifest, checksums, model fingerprints.

An index is a directory (see ``docs/retrieval.md``)::

    manifest.json   format, version, stages, kind, model path + fingerprint, shapes, dtype,
                    faiss settings, grid, and the size + sha256 of every file below
    side.npy        engine-ready tensors: image side (N, R, Dt) or caption features (M, W, Dt)
                    (two-stage indexes only)
    lengths.npy     (N,) int64 real regions / words of each item (two-stage indexes only)
    global.npy      (N, Dt) float32 index vectors: the first stage of a two-stage index, the
                    whole content of a one-stage index
    faiss.index     the FAISS index over global.npy
    ids.txt         one id per line
    paths.txt       one image path per line (empty lines when unknown)
    captions.txt    the caption texts (caption index only)

Two-stage indexes (ESL: shortlist, then re-rank with the stored sides) are format version 1.
Sharded two-stage image indexes (large galleries) are version 3: ``side``, ``lengths`` and
``global`` live in ``shards/NNNNN/`` (each shard written whole, then renamed into place, and
recorded with its own sizes and checksums), the side in float16, float32 or int8 with a
float32 scale per region vector (``scale.npy (n, R)``); see :class:`ShardedArray`.
One-stage indexes (models whose score IS the inner product of their index vectors:
``exact_index``) are version 2 with ``"stages": 1`` and hold no side or lengths; a version 1
manifest whose model record says ``"stages": 1`` (written by eslmatch before version 2)
is a one-stage index that still carries a side of one vector per item.

It is always written into a temporary directory beside the target and renamed into place,
so readers never see a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EslmatchError
from .ann import FAISS_KINDS

FORMAT = "eslmatch-gallery-index"
VERSION = 1  # two-stage indexes (and every index written before one-stage ones had their own layout)
ONE_STAGE_VERSION = 2  # one-stage indexes: vectors only
SHARDED_VERSION = 3  # two-stage image indexes whose arrays live in shards
SUPPORTED_VERSIONS = (1, 2, 3)
KINDS = ("image", "caption")
DTYPES = ("float32", "float16")
SHARD_DTYPES = ("float32", "float16", "int8")

MANIFEST = "manifest.json"
SIDE = "side.npy"
LENGTHS = "lengths.npy"
GLOBAL = "global.npy"
FAISS = "faiss.index"
IDS = "ids.txt"
PATHS = "paths.txt"
CAPTIONS = "captions.txt"
ARRAY_FILES = (SIDE, LENGTHS, GLOBAL)
SCALE = "scale.npy"
SHARDS = "shards"
SHARD_RECORD = "shard.json"


def data_files(kind: str, side: bool = True, sharded: bool = False) -> tuple[str, ...]:
    """Every top-level file of an index of ``kind`` except the manifest (``side=False``: a
    one-stage index, which stores no side and no lengths; ``sharded``: a version 3 index, whose
    arrays are in its shards, see :func:`shard_files`)."""
    arrays: tuple[str, ...] = () if sharded else ARRAY_FILES if side else (GLOBAL,)
    files = (*arrays, FAISS, IDS, PATHS)
    return (*files, CAPTIONS) if kind == "caption" else files


def shard_files(dtype: str) -> tuple[str, ...]:
    """The array files of one shard of a version 3 index (``scale.npy`` with an int8 side)."""
    return (SIDE, SCALE, LENGTHS, GLOBAL) if dtype == "int8" else ARRAY_FILES


def shard_name(i: int) -> str:
    """``shards/00007``: the folder of shard ``i`` (relative to the index)."""
    return f"{SHARDS}/{i:05d}"


def is_sharded(manifest: dict[str, Any]) -> bool:
    """Whether a checked manifest describes a sharded (version 3) index."""
    return manifest.get("version") == SHARDED_VERSION


def manifest_stages(manifest: dict[str, Any]) -> int:
    """1 (one-stage, exact) or 2 (shortlist + re-rank) for a checked manifest."""
    if manifest.get("version") == VERSION:
        model = manifest.get("model")
        return 1 if isinstance(model, dict) and model.get("stages") == 1 else 2
    return int(manifest["stages"])


def manifest_has_side(manifest: dict[str, Any]) -> bool:
    """Whether the index stores ``side.npy`` and ``lengths.npy`` (every version 1 index does)."""
    return manifest.get("version") == VERSION or manifest_stages(manifest) == 2


class GalleryIndexError(EslmatchError):
    """A gallery index that is damaged, of an unknown version, or built by another model."""


# ---------------------------------------------------------------------- checksums
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_records(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of files in ``directory``."""
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names}


def check_files(directory: Path, manifest: dict[str, Any], verify: bool) -> None:
    """Every listed file exists with its recorded size (and sha256 when ``verify``)."""
    records = manifest.get("files")
    if not isinstance(records, dict):
        raise GalleryIndexError(f"{directory / MANIFEST}: no 'files' table")
    sharded = is_sharded(manifest)
    check_records(
        directory,
        records,
        data_files(manifest["kind"], manifest_has_side(manifest), sharded),
        verify,
        directory / MANIFEST,
    )
    if not sharded:
        return
    shards = manifest["shards"]
    for i, shard in enumerate(shards):
        folder = directory / shard["dir"]
        if not folder.is_dir():
            raise GalleryIndexError(
                f"{folder}: missing shard {i + 1} of {len(shards)} of the index ({shard['rows']} items; "
                "rebuild it with 'eslmatch index build')"
            )
        check_records(
            folder, shard["files"], shard_files(manifest["dtype"]), verify, directory / MANIFEST, "shard", shard["dir"]
        )


def check_records(
    directory: Path,
    records: Any,
    names: Iterable[str],
    verify: bool,
    manifest_path: Path,
    where: str = "index",
    prefix: str = "",
) -> None:
    """Each of ``names`` exists in ``directory`` with the size recorded in ``records`` (and
    its sha256 when ``verify``); failures are one line naming the file (``prefix``: the
    folder of ``directory`` in the index, for messages)."""
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
                f"{path}: {size} bytes, the manifest records {rec['bytes']} (truncated or modified)"
            )
        if verify and sha256_file(path) != rec["sha256"]:
            raise GalleryIndexError(f"{path}: sha256 differs from the manifest (the file was modified or corrupted)")


# ---------------------------------------------------------------------- model fingerprint
_SAMPLES_PER_TENSOR = 1024
_IGNORED_CONFIG_KEYS = ("extra", "text_model")


def model_fingerprint(model: Any) -> str:
    """A content fingerprint of a model: its configuration and a sample of every weight.

    The configuration (without free-form ``extra`` and the text model's *location*), the
    name, shape and dtype of every tensor of the state dict and up to 1,024 evenly spaced
    values of each (all values of small tensors) are hashed. It is the same for a model
    saved and reloaded, moved or copied, and differs for another training run or any
    changed layer. Costs a few milliseconds even for BERT-base.
    """
    import torch

    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    tokens = getattr(getattr(model, "tokenizer", None), "tokens", None)
    if isinstance(tokens, list):  # a WordVocab is part of a GRU model
        h.update(json.dumps(tokens).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue  # training bookkeeping, no effect on scores
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() > _SAMPLES_PER_TENSOR:
                idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
                flat = flat[idx]
            h.update(flat.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- text files
def write_lines(path: Path, items: Sequence[str]) -> None:
    path.write_text("".join(f"{s}\n" for s in items), encoding="utf-8")


def read_lines(path: Path, count: int) -> list[str]:
    """Exactly ``count`` lines of ``path`` (empty lines kept)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryIndexError(f"{path}: unreadable ({exc})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise GalleryIndexError(f"{path}: {len(lines)} lines, the index holds {count} items")
    return lines


def clean_line(value: Any, what: str, i: int) -> str:
    s = "" if value is None else str(value)
    if "\n" in s or "\r" in s:
        raise EslmatchError(f"{what} {i} contains a line break: {s!r}")
    return s


# ---------------------------------------------------------------------- manifest
def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and check the manifest's format, version and kind."""
    if not directory.exists():
        raise GalleryIndexError(f"{directory}: no such index directory")
    if not directory.is_dir():
        raise GalleryIndexError(f"{directory}: an index is a directory (built by 'eslmatch index build')")
    path = directory / MANIFEST
    if not path.is_file():
        raise GalleryIndexError(f"{path}: missing (not an eslmatch gallery index, or a damaged one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GalleryIndexError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryIndexError(f"{path}: not an eslmatch gallery index manifest (format != {FORMAT!r})")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise GalleryIndexError(
            f"{path}: index format version {version!r} is not supported by this eslmatch "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); rebuild the index"
        )
    stages = manifest.get("stages")
    if version == ONE_STAGE_VERSION and (isinstance(stages, bool) or stages not in (1, 2)):
        raise GalleryIndexError(f"{path}: 'stages' must be 1 or 2, got {stages!r}")
    if version == SHARDED_VERSION and (isinstance(stages, bool) or stages != 2 or manifest.get("kind") != "image"):
        raise GalleryIndexError(f"{path}: a version 3 (sharded) index is a two-stage image index")
    if manifest.get("kind") not in KINDS:
        raise GalleryIndexError(f"{path}: kind {manifest.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key, typ in (
        ("count", int),
        ("total_dim", int),
        ("width", int),
        ("dtype", str),
        ("model", dict),
        ("faiss", dict),
    ):
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise GalleryIndexError(f"{path}: missing or invalid {key!r}")
    dtypes = SHARD_DTYPES if version == SHARDED_VERSION else DTYPES
    if manifest["dtype"] not in dtypes:
        raise GalleryIndexError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(dtypes)}")
    if manifest["count"] < 1 or manifest["total_dim"] < 1 or manifest["width"] < 1:
        raise GalleryIndexError(f"{path}: count, total_dim and width must be positive")
    if manifest["faiss"].get("kind") not in FAISS_KINDS:
        raise GalleryIndexError(
            f"{path}: faiss kind {manifest['faiss'].get('kind')!r} is not one of {', '.join(FAISS_KINDS)}"
        )
    grid = manifest.get("grid")
    if grid is not None and not (
        isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
    ):
        raise GalleryIndexError(f"{path}: grid must be null or [h, w], got {grid!r}")
    if version == SHARDED_VERSION:
        check_shard_table(path, manifest)
    return manifest


def check_shard_table(path: Path, manifest: dict[str, Any]) -> None:
    """The ``shards`` list of a version 3 manifest: ``{"dir": "shards/NNNNN", "rows", "files"}``
    in order, rows adding up to ``count``."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise GalleryIndexError(f"{path}: a version 3 index needs a non-empty 'shards' list")
    total = 0
    for i, shard in enumerate(shards):
        rows = shard.get("rows") if isinstance(shard, dict) else None
        if (
            not isinstance(shard, dict)
            or shard.get("dir") != shard_name(i)
            or not isinstance(rows, int)
            or isinstance(rows, bool)
            or rows < 1
            or not isinstance(shard.get("files"), dict)
        ):
            raise GalleryIndexError(f"{path}: shard {i} must be {{'dir': {shard_name(i)!r}, 'rows' > 0, 'files'}}")
        total += rows
    if total != manifest["count"]:
        raise GalleryIndexError(f"{path}: the shards hold {total} items, 'count' says {manifest['count']}")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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


def read_rows(arr: Any, rows: np.ndarray) -> np.ndarray:
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


def prefetch(arr: Any, rows: np.ndarray) -> None:
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


def release(arr: Any) -> None:
    """Drop the pages of the memory map(s) behind ``arr`` from this process (``MADV_DONTNEED``
    on a read-only file mapping: they stay in the page cache, and the next read of them is a
    cheap minor fault). Bounds the resident memory of a process that reads scattered rows."""
    _madvise(arr, "MADV_DONTNEED")


def advise(arr: Any, random_access: bool) -> None:
    """``madvise`` the memory map(s) behind ``arr`` (an ``np.memmap`` or a :class:`ShardedArray`):
    ``MADV_RANDOM`` (no read-ahead: a query that reads 100 scattered rows of 24 KB reads about
    that much, not ~100 x the kernel's read-ahead window) or ``MADV_NORMAL`` (read-ahead, for
    scans). A no-op where the platform has no ``madvise``."""
    _madvise(arr, "MADV_RANDOM" if random_access else "MADV_NORMAL")


def _madvise(arr: Any, name: str) -> None:
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


# ---------------------------------------------------------------------- atomic directories
def check_target(out: Path) -> None:
    """Refuse to replace anything but an existing index (or an empty directory)."""
    if out.is_file():
        raise EslmatchError(f"{out}: a file is in the way (an index is a directory)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise EslmatchError(f"{out}: a non-empty directory that is not an index; choose another --out")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------- sharded arrays
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

    def _tail(self, rest: tuple) -> tuple[int, ...]:
        index = (slice(None), *rest)
        return tuple(np.empty((0, *self.shape[1:]), dtype=np.uint8)[index].shape[1:])

    def __getitem__(self, key: Any) -> Any:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
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

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype, copy=False)


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
