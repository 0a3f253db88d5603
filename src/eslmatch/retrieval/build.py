"""Building, extending and re-indexing gallery indexes (always atomically).

A two-stage model (ESL) gets the side, lengths and first-stage vectors of every item; a
one-stage model (``exact_index``: VSE, ESL-CLIP) only its index vectors (``global.npy``).

Large two-stage image galleries (more than one shard of 65,536 items, or an int8 side) are
written sharded (format version 3) into a staging folder ``.NAME.building`` beside the index
that survives a kill: each shard appears whole (written under a temporary name, synced,
renamed) with its sizes and checksums, so building again with the same inputs resumes after
every complete shard (in any order); the finished folder replaces ``NAME`` at the end.
``index add`` to a sharded index links the existing shards (no copy) and appends new ones
the same way.

Under ``torchrun`` (a :class:`~eslmatch.extract.distributed.ExtractJob` passed as ``job``),
a sharded build is shared by the processes: shard ``i`` is encoded and written by rank
``i % N`` (on a resume, the missing shards are dealt round-robin), every rank into the same
staging folder; after they all finished, rank 0 checks that every shard is complete, builds
the FAISS first stage and writes the manifest: the same bytes as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import eval_mode, length_batches
from ..errors import EslmatchError
from ..extract.distributed import ExtractJob, JobFailed, deal, stop_hook_for_tests
from ..utils import atomic_dir, atomic_write_text, pid_alive, replace_dir, resolve_device
from . import ann
from .encode import (
    caption_vectors,
    encode_images,
    encode_token_batch,
    image_vectors,
    is_one_stage,
    require_two_stage,
    takes_pixels,
    tokenize_all,
)
from .index import GalleryIndex
from .sources import (
    CaptionSource,
    ImageSource,
    PhotoSource,
    caption_source,
    image_source,
    load_pixels,
    paths_from_dir,
    photo_source,
)
from .store import (
    CAPTIONS,
    FAISS,
    FORMAT,
    GLOBAL,
    IDS,
    LENGTHS,
    MANIFEST,
    ONE_STAGE_VERSION,
    PATHS,
    SCALE,
    SHARD_DTYPES,
    SHARD_RECORD,
    SHARDED_VERSION,
    SHARDS,
    SIDE,
    VERSION,
    GalleryIndexError,
    ShardedArray,
    check_records,
    check_target,
    clean_line,
    data_files,
    file_records,
    is_sharded,
    link_or_copy,
    manifest_has_side,
    model_fingerprint,
    open_array,
    quantize_int8,
    read_manifest,
    shard_files,
    shard_name,
    write_lines,
    write_manifest,
)

_COPY_ROWS_BYTES = 64 << 20
_PARTIAL = "global.partial.npy"
_LISTED_SKIPS = 1000  # skipped files named in the manifest (all are reported while building)

Report = Callable[[str], None]


# ---------------------------------------------------------------------- small helpers
def _progress(total: int, progress: bool, desc: str) -> Any:
    return tqdm(total=total, desc=desc, disable=None if progress else True, leave=False, unit="item")


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EslmatchError(f"batch size must be a positive integer, got {batch_size!r}")


def _ids(
    given: Sequence[Any] | None, found: list[str] | None, n: int, start: int, taken: Sequence[str] = ()
) -> list[str]:
    """Item ids: given, else from the data, else ``str(start + i)``; all unique."""
    if given is not None:
        ids = [clean_line(v, "id", i) for i, v in enumerate(given)]
        if len(ids) != n:
            raise EslmatchError(f"{len(ids)} ids given for {n} items")
    else:
        ids = list(found) if found is not None else [str(start + i) for i in range(n)]
    seen = set(taken)
    for i, s in enumerate(ids):
        if not s:
            raise EslmatchError(f"id {i} is empty")
        if s in seen:
            raise EslmatchError(f"duplicate id {s!r} (ids must be unique in an index; pass ids=)")
        seen.add(s)
    return ids


def _paths(given: Sequence[Any] | None, found: list[str] | None, n: int, images_dir: Any, ids: list[str]) -> list[str]:
    if given is not None:
        paths = [clean_line(v, "path", i) for i, v in enumerate(given)]
        if len(paths) != n:
            raise EslmatchError(f"{len(paths)} paths given for {n} items")
        return paths
    if images_dir is not None:
        return paths_from_dir(images_dir, n, found, ids)
    return [clean_line(v, "path", i) for i, v in enumerate(found)] if found is not None else [""] * n


def _image_items(model: Any, features: Any, split: str, lengths: Any, grid: Any) -> ImageSource:
    """Region features to embed (two-stage indexes and one-stage models of region features)."""
    return image_source(features, img_dim=model.config.img_dim, split=split, lengths=lengths, grid=grid)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """The report of a torchrun rank other than 0 (rank 0 says everything worth saying)."""


def _device(model: Any, device: Any) -> None:
    if device is not None:
        model.to(resolve_device(device, model))


def _begin(model: Any, out: str | Path, faiss_kind: str, batch_size: int, device: Any) -> Path:
    """The checks a new index starts with (``out`` free, arguments valid); the model moved to
    ``device``; returns ``out`` as a path."""
    require_two_stage(model)
    ann.check_kind(faiss_kind)
    _check_batch(batch_size)
    out = Path(out)
    check_target(out)
    _device(model, device)
    return out


def _alloc(tmp: Path, n: int, width: int, dt: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fmt = np.lib.format
    side = fmt.open_memmap(tmp / SIDE, mode="w+", dtype=np.dtype(dtype), shape=(n, width, dt))
    lengths = fmt.open_memmap(tmp / LENGTHS, mode="w+", dtype=np.int64, shape=(n,))
    glob = fmt.open_memmap(tmp / GLOBAL, mode="w+", dtype=np.float32, shape=(n, dt))
    return side, lengths, glob


def _store_rows(
    arrays: tuple, rows: slice | np.ndarray, feats: torch.Tensor, g: torch.Tensor, lens: torch.Tensor
) -> None:
    """Write encoded items to ``rows`` of the new arrays (beyond each width stays zero)."""
    side, lengths, glob = arrays
    w = feats.shape[1]
    side[rows, :w] = feats.detach().to(torch.float32).cpu().numpy().astype(side.dtype, copy=False)
    lengths[rows] = lens.cpu().numpy()
    glob[rows] = g.detach().to(torch.float32).cpu().numpy()


def _encode_image_rows(
    model: Any, src: ImageSource, arrays: tuple, start: int, batch_size: int, progress: bool
) -> None:
    with eval_mode(model), _progress(src.count, progress, "images") as bar:
        for i0 in range(0, src.count, batch_size):
            i1 = min(i0 + batch_size, src.count)
            lens = None if src.lengths is None else src.lengths[i0:i1]
            feats, g, lens_t = encode_images(model, src.read(i0, i1), lens)
            _store_rows(arrays, slice(start + i0, start + i1), feats, g, lens_t)
            bar.update(i1 - i0)


def _encode_caption_rows(
    model: Any, tokens: list[torch.Tensor], arrays: tuple, start: int, batch_size: int, progress: bool
) -> None:
    batches = length_batches([int(t.numel()) for t in tokens], batch_size)
    with eval_mode(model), _progress(len(tokens), progress, "captions") as bar:
        for idx in batches:
            feats, g, lens = encode_token_batch(model, [tokens[int(i)] for i in idx])
            _store_rows(arrays, start + np.asarray(idx, dtype=np.int64), feats, g, lens)  # back to caption order
            bar.update(len(idx))


def _copy_rows(src: Any, dst: tuple, n: int) -> None:
    """Copy the first ``n`` rows of an open index into new (possibly wider) arrays."""
    side, lengths, glob = dst
    w = src.side.shape[1]
    step = max(1, _COPY_ROWS_BYTES // max(1, src.side[0].nbytes))
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        side[i0:i1, :w] = src.side[i0:i1]
        side[i0:i1, w:] = 0
    lengths[:n] = src.lengths[:n]
    glob[:n] = src.global_vectors[:n]


def _model_record(model: Any, model_path: Any, text_model: Any) -> dict[str, Any]:
    c = model.config
    record = {
        "path": None if model_path is None else str(Path(model_path).resolve()),
        "text_model": None if text_model is None else str(text_model),
        "fingerprint": model_fingerprint(model),
        "config": {
            key: getattr(c, key, None)
            for key in ("model_type", "strategy", "embed_size", "kernel_size", "num_levels", "img_dim", "text_encoder")
        },
        "stages": 1 if is_one_stage(model) else 2,
    }
    if is_one_stage(model):
        record["inputs"] = "pixels" if takes_pixels(model) else "regions"
    return record


def _finish(
    tmp: Path,
    manifest: dict[str, Any],
    arrays: tuple,
    ids: list[str],
    paths: list[str],
    captions: list[str] | None,
    faiss_index: Any,
) -> None:
    for arr in arrays:
        arr.flush()
    del arrays
    ann.write(faiss_index, tmp / FAISS)
    write_lines(tmp / IDS, ids)
    write_lines(tmp / PATHS, paths)
    if captions is not None:
        write_lines(tmp / CAPTIONS, captions)
    manifest["files"] = file_records(tmp, data_files(manifest["kind"], manifest_has_side(manifest)))
    write_manifest(tmp, manifest)


# ---------------------------------------------------------------------- one-stage: vectors only
class _Vectors:
    """``global.npy`` of a one-stage index, written by rows; its width is learnt from the first
    rows written (the model's index vectors), and :meth:`finish` keeps the first ``n`` rows
    (files that could not be read leave the end unused)."""

    def __init__(self, tmp: Path, capacity: int, dim: int | None = None) -> None:
        self.tmp, self.capacity, self.dim = tmp, capacity, dim
        self.array: np.memmap | None = None
        if dim is not None:
            self._alloc(dim)

    def _alloc(self, dim: int) -> None:
        self.dim = dim
        shape = (self.capacity, dim)
        self.array = np.lib.format.open_memmap(self.tmp / _PARTIAL, mode="w+", dtype=np.float32, shape=shape)

    def write(self, rows: slice | np.ndarray, vectors: torch.Tensor | np.ndarray) -> None:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to(torch.float32).cpu().numpy()
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2:
            raise EslmatchError(f"index vectors must be (B, K), the model gave {v.shape}")
        if self.array is None:
            self._alloc(v.shape[1])
        elif v.shape[1] != self.dim:
            raise EslmatchError(
                f"the model gives index vectors of width {v.shape[1]}, the index holds width {self.dim}"
            )
        assert self.array is not None
        self.array[rows] = v

    def finish(self, n: int) -> np.ndarray:
        """Write ``global.npy`` (the first ``n`` rows) and return it memory-mapped."""
        if self.array is None or self.dim is None:
            raise EslmatchError("nothing to index")
        part, final = self.tmp / _PARTIAL, self.tmp / GLOBAL
        self.array.flush()
        if n == self.capacity:
            self.array = None
            os.replace(part, final)
        else:
            out = np.lib.format.open_memmap(final, mode="w+", dtype=np.float32, shape=(n, self.dim))
            step = max(1, _COPY_ROWS_BYTES // max(1, self.dim * 4))
            for i0 in range(0, n, step):
                out[i0 : min(i0 + step, n)] = self.array[i0 : min(i0 + step, n)]
            out.flush()
            del out
            self.array = None
            part.unlink()
        return open_array(final)


def _vector_image_rows(
    model: Any, src: ImageSource, sink: _Vectors, start: int, batch_size: int, progress: bool
) -> None:
    with eval_mode(model), _progress(src.count, progress, "images") as bar:
        for i0 in range(0, src.count, batch_size):
            i1 = min(i0 + batch_size, src.count)
            lens = None if src.lengths is None else src.lengths[i0:i1]
            sink.write(slice(start + i0, start + i1), image_vectors(model, src.read(i0, i1), lens))
            bar.update(i1 - i0)


def _vector_photo_rows(
    model: Any, src: PhotoSource, sink: _Vectors, start: int, batch_size: int, progress: bool, report: Report
) -> tuple[list[int], list[tuple[str, str]]]:
    """Encode the readable files of ``src`` into rows ``start, start + 1, ...``; returns the
    kept files' positions in ``src`` and ``(name, reason)`` of every file left out."""
    skipped = list(src.refused)
    for name, why in src.refused:
        report(f"eslmatch: warning: skipping {name}: {why}")
    kept: list[int] = []
    with eval_mode(model), _progress(src.count, progress, "images") as bar:
        for i0 in range(0, src.count, batch_size):
            i1 = min(i0 + batch_size, src.count)
            pixels, ok, bad = load_pixels(src, i0, i1, model.preprocess)
            for name, why in bad:
                report(f"eslmatch: warning: skipping {name}: {why}")
            skipped += bad
            if pixels:
                row = start + len(kept)
                sink.write(slice(row, row + len(ok)), image_vectors(model, torch.stack(pixels)))
                kept += ok
            bar.update(i1 - i0)
    if not kept:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise EslmatchError(f"no readable image among the {src.count} files{first}")
    return kept, skipped


def _vector_caption_rows(
    model: Any, tokens: list[torch.Tensor], sink: _Vectors, start: int, batch_size: int, progress: bool
) -> None:
    batches = length_batches([int(t.numel()) for t in tokens], batch_size)
    with eval_mode(model), _progress(len(tokens), progress, "captions") as bar:
        for idx in batches:
            sink.write(start + np.asarray(idx, dtype=np.int64), caption_vectors(model, [tokens[int(i)] for i in idx]))
            bar.update(len(idx))


def _skip_record(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    listed = [{"file": f, "reason": r} for f, r in skipped[:_LISTED_SKIPS]]
    return {"skipped": len(skipped), "skipped_files": listed}


class _SourceItems:
    """The images an index is built from or extended with: photos for a model that takes
    pixels, else region features; ids and paths per candidate (the Milvus writer's too)."""

    def __init__(
        self,
        model: Any,
        features: Any,
        *,
        split: str,
        lengths: Any,
        ids: Sequence[Any] | None,
        paths: Sequence[Any] | None,
        images_dir: Any,
        start: int,
        grid: Any = None,
        taken: Sequence[str] = (),
    ) -> None:
        self.photos: PhotoSource | None = None
        self.regions: ImageSource | None = None
        if takes_pixels(model):
            self.photos = photo_source(features, images_dir=images_dir, split=split)
            self.count = self.photos.count
            self.ids = _ids(ids, self.photos.ids, self.count, start, taken)
            self.paths = _paths(paths, [str(f) for f in self.photos.files], self.count, None, self.ids)
            self.description = self.photos.description
        else:
            self.regions = _image_items(model, features, split, lengths, grid)
            self.count = self.regions.count
            self.ids = _ids(ids, self.regions.ids, self.count, start, taken)
            self.paths = _paths(paths, self.regions.paths, self.count, images_dir, self.ids)
            self.description = self.regions.description


class _NewImages(_SourceItems):
    """The images of a one-stage index (a model of one vector per image)."""

    def encode(
        self, model: Any, sink: _Vectors, start: int, batch_size: int, progress: bool, report: Report
    ) -> dict[str, Any]:
        """Write the vectors from row ``start``; keep the ids and paths of what was indexed;
        returns the manifest's record of this source."""
        if self.photos is None:
            assert self.regions is not None
            _vector_image_rows(model, self.regions, sink, start, batch_size, progress)
            return {**self.description, "count": self.count}
        kept, skipped = _vector_photo_rows(model, self.photos, sink, start, batch_size, progress, report)
        self.ids = [self.ids[i] for i in kept]
        self.paths = [self.paths[i] for i in kept]
        self.count = len(kept)
        return {**self.description, "count": self.count, **_skip_record(skipped)}


def _one_stage_manifest(
    kind: str, model: Any, model_path: Any, text_model: Any, vectors: np.ndarray, faiss_kind: str, opts: Any
) -> dict[str, Any]:
    n, dim = vectors.shape
    return {
        "format": FORMAT,
        "version": ONE_STAGE_VERSION,
        "stages": 1,
        "kind": kind,
        "created": _now(),
        "eslmatch_version": __version__,
        "model": _model_record(model, model_path, text_model),
        "total_dim": int(dim),
        "width": 1,
        "count": int(n),
        "dtype": "float32",
        "grid": None,
        "faiss": {"kind": faiss_kind, "options": opts.to_dict(), "trained_on": int(n)},
    }


def _build_one_stage_images(
    model: Any,
    features: Any,
    out: Path,
    *,
    faiss_kind: str,
    faiss_options: Any,
    batch_size: int,
    progress: bool,
    model_path: Any,
    text_model: Any,
    report: Report,
    **source: Any,
) -> Path:
    items = _NewImages(model, features, start=0, **source)
    with atomic_dir(out) as tmp:
        sink = _Vectors(tmp, items.count)
        record = items.encode(model, sink, 0, batch_size, progress, report)
        vectors = sink.finish(items.count)
        opts = ann.resolve_options(faiss_kind, items.count, faiss_options, vectors.shape[1])
        manifest = _one_stage_manifest("image", model, model_path, text_model, vectors, faiss_kind, opts)
        manifest["sources"] = [record]
        faiss_index = ann.build(vectors, faiss_kind, opts)
        _finish(tmp, manifest, (), items.ids, items.paths, None, faiss_index)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------- sharded (version 3) indexes
DEFAULT_SHARD_ROWS = 65536
BUILD_RECORD = "build.json"
# Test hooks: called with the shard number after each shard is complete (e.g. to simulate a
# kill); under torchrun, the environment hook of eslmatch.extract.distributed.stop_hook_for_tests
# (``ESLMATCH_TEST_STOP_AFTER_CHUNKS=N``: a rank stops after writing N shards).
AFTER_SHARD: Callable[[int], None] | None = None


def staging_dir(out: Path) -> Path:
    """Where a sharded build or add of ``out`` is written (kept when interrupted, to resume)."""
    return out.with_name(f".{out.name}.building")


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


class _ShardArrays:
    """The arrays of one shard being written: side ``(n, R, Dt)`` (float16/float32, or int8
    with ``scale (n, R)`` float32), lengths ``(n,)`` int64, global ``(n, Dt)`` float32."""

    def __init__(self, folder: Path, n: int, width: int, dt: int, dtype: str) -> None:
        fmt = np.lib.format
        self.names = shard_files(dtype)
        self.int8 = dtype == "int8"
        self.side = fmt.open_memmap(folder / SIDE, mode="w+", dtype=np.dtype(dtype), shape=(n, width, dt))
        self.scale = (
            fmt.open_memmap(folder / SCALE, mode="w+", dtype=np.float32, shape=(n, width)) if self.int8 else None
        )
        self.lengths = fmt.open_memmap(folder / LENGTHS, mode="w+", dtype=np.int64, shape=(n,))
        self.glob = fmt.open_memmap(folder / GLOBAL, mode="w+", dtype=np.float32, shape=(n, dt))

    def store(self, rows: slice, feats: torch.Tensor, g: torch.Tensor, lens: torch.Tensor) -> None:
        """Encoded items ``feats (B, w, Dt)`` (w <= R; beyond stays zero), ``g (B, Dt)``, ``lens (B,)``."""
        w = feats.shape[1]
        x = feats.detach().to(torch.float32).cpu().numpy()
        if self.scale is not None:
            q, scale = quantize_int8(x)
            self.side[rows, :w] = q
            self.scale[rows, :w] = scale
        else:
            self.side[rows, :w] = x.astype(self.side.dtype, copy=False)
        self.lengths[rows] = lens.cpu().numpy()
        self.glob[rows] = g.detach().to(torch.float32).cpu().numpy()

    def close(self) -> None:
        for arr in (self.side, self.scale, self.lengths, self.glob):
            if arr is not None:
                arr.flush()
        self.side = self.scale = self.lengths = self.glob = None  # type: ignore[assignment]


class _ShardWriter:
    """Writes the shards of a version 3 index into a staging folder that survives a kill.

    ``build.json`` in the folder holds what is being built (``spec``) and the writer's pid.
    Shard ``i`` is written into ``shards/.NNNNN.tmp-PID``, synced, given its ``shard.json``
    (rows, sizes, sha256) and renamed to ``shards/NNNNN``: it exists complete or not at all.
    A later writer with the same spec keeps every complete shard (never rewritten; shards may
    have been completed in any order, e.g. by the ranks of a torchrun job) and the caller
    writes the missing ones; one with another spec starts anew. :attr:`done` maps the
    numbers of the complete shards to their records; :attr:`records` lists them in order, as
    the manifest records them.

    ``attach=True``: the writer of a torchrun rank other than 0, in the folder rank 0's
    writer opened (nothing is cleaned or recorded; the folder must be visible here).
    """

    def __init__(self, staging: Path, spec: dict[str, Any], report: Report, attach: bool = False) -> None:
        self.staging = staging
        self.spec = json.loads(json.dumps(spec, default=str))
        self.done: dict[int, dict[str, Any]] = {}
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
                raise EslmatchError(f"{staging}: another eslmatch process (pid {pid}) is writing this index")
            if prior is not None and prior.get("spec") == self.spec:
                self.done = self._complete()
            else:
                report(f"eslmatch: note: discarding {staging}, an unfinished build of other inputs")
                shutil.rmtree(staging)
        (staging / SHARDS).mkdir(parents=True, exist_ok=True)
        atomic_write_text(staging / BUILD_RECORD, json.dumps({"spec": self.spec, "pid": os.getpid()}, indent=2))

    @property
    def records(self) -> list[dict[str, Any]]:
        return [self.done[i] for i in sorted(self.done)]

    def _prior(self) -> dict[str, Any] | None:
        try:
            prior = json.loads((self.staging / BUILD_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return prior if isinstance(prior, dict) else None

    def _read(self, i: int) -> dict[str, Any] | None:
        """The record of shard ``i`` if it is complete (its ``shard.json`` and files of the
        recorded sizes), else ``None``."""
        folder = self.staging / shard_name(i)
        try:
            rec = json.loads((folder / SHARD_RECORD).read_text(encoding="utf-8"))
            files = rec["files"]
            check_records(folder, files, shard_files(self.spec["dtype"]), False, folder / SHARD_RECORD, "shard")
            rows = int(rec["rows"])
        except (OSError, ValueError, KeyError, TypeError, GalleryIndexError):
            return None
        return {"dir": shard_name(i), "rows": rows, "files": files}

    def _complete(self) -> dict[int, dict[str, Any]]:
        """The complete shards already written; anything else in ``shards/`` (half-written
        or damaged) is removed."""
        done: dict[int, dict[str, Any]] = {}
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
    def shard(self, i: int, n: int, width: int, dt: int) -> Iterator[_ShardArrays]:
        """Yield the arrays of shard ``i`` (``n`` rows); on success it is sealed and recorded."""
        if i in self.done:
            raise AssertionError(f"shard {i} is complete already")
        tmp = self.staging / SHARDS / f".{i:05d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            arrays = _ShardArrays(tmp, n, width, dt, self.spec["dtype"])
            yield arrays
            arrays.close()
            self._seal(tmp, i, n, file_records(tmp, arrays.names), fsync=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def adopt(self, i: int, source: Path, record: dict[str, Any]) -> None:
        """Take shard ``i`` of an existing index (``source``, its manifest ``record``) by
        hard links (a copy across file systems)."""
        tmp = self.staging / SHARDS / f".{i:05d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            for name in shard_files(self.spec["dtype"]):
                link_or_copy(source / record["dir"] / name, tmp / name)
            if (source / record["dir"] / SHARD_RECORD).is_file():
                link_or_copy(source / record["dir"] / SHARD_RECORD, tmp / SHARD_RECORD)
            self._seal(tmp, i, int(record["rows"]), record["files"], fsync=False)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _seal(self, tmp: Path, i: int, n: int, files: dict[str, Any], fsync: bool) -> None:
        if fsync:
            for name in files:
                _fsync_path(tmp / name)
        rec = {"rows": n, "files": files}
        text = json.dumps(rec, indent=2, sort_keys=True) + "\n"
        record = tmp / SHARD_RECORD
        if not record.is_file() or record.read_text(encoding="utf-8") != text:
            record.unlink(missing_ok=True)  # never write through a link into another index
            record.write_text(text, encoding="utf-8")
            _fsync_path(record)
        os.replace(tmp, self.staging / shard_name(i))
        _fsync_path(self.staging / SHARDS)
        self.done[i] = {"dir": shard_name(i), **rec}

    def vectors(self) -> ShardedArray:
        """The global vectors ``(N, Dt)`` of the complete shards, memory-mapped."""
        return ShardedArray([open_array(self.staging / r["dir"] / GLOBAL) for r in self.records])

    def finish(self, target: Path) -> None:
        """Replace ``target`` with the finished staging folder (the manifest is written)."""
        _fsync_path(self.staging)
        replace_dir(self.staging, target)
        (target / BUILD_RECORD).unlink(missing_ok=True)  # after the rename: a kill before it can still resume


def _encode_shards(
    model: Any,
    src: ImageSource,
    writer: _ShardWriter,
    shards: Sequence[int],
    base: int,
    shard_rows: int,
    width: int,
    batch_size: int,
    progress: bool,
    job: ExtractJob,
) -> None:
    """Encode shards ``shards`` (shard ``i`` holds items ``(i - base) * shard_rows ...`` of
    ``src``), each written whole by ``writer``."""
    dt = model.config.total_dim

    def rows(i: int) -> range:
        j0 = (i - base) * shard_rows
        return range(j0, min(src.count, j0 + shard_rows))

    mine = sum(len(rows(i)) for i in shards)
    # alone: the whole gallery (complete shards counted done); a rank: its own share
    total, desc = (mine, f"images (rank {job.rank} of {job.world})") if job.distributed else (src.count, "images")
    with eval_mode(model), _progress(total, progress, desc) as bar:
        bar.update(total - mine)
        for written, i in enumerate(shards, 1):
            r = rows(i)
            with writer.shard(i, len(r), width, dt) as arrays:
                for b0 in range(r.start, r.stop, batch_size):
                    b1 = min(b0 + batch_size, r.stop)
                    lens = None if src.lengths is None else src.lengths[b0:b1]
                    feats, g, lens_t = encode_images(model, src.read(b0, b1), lens)
                    arrays.store(slice(b0 - r.start, b1 - r.start), feats, g, lens_t)
                    bar.update(b1 - b0)
            if AFTER_SHARD is not None:
                AFTER_SHARD(i)
            stop_hook_for_tests(job.rank, written)


def _source_spec(src: ImageSource, ids: list[str], paths: list[str]) -> dict[str, Any]:
    """What identifies the items being encoded, for resuming: the source's description and
    shape, a digest of its first item, its lengths, ids and paths."""
    probe = np.asarray(src.read(0, 1), dtype=np.float32) if src.count else np.zeros(0, dtype=np.float32)
    lengths = None if src.lengths is None else np.asarray(src.lengths, dtype=np.int64)
    return {
        "source": src.description,
        "count": src.count,
        "regions": src.regions,
        "dim": src.dim,
        "digest": _digest(probe, lengths if lengths is not None else "all", ids, paths),
    }


def _side_dtype(fp16: bool, side_dtype: str | None) -> str:
    if side_dtype is None:
        return "float16" if fp16 else "float32"
    if side_dtype not in SHARD_DTYPES:
        raise EslmatchError(f"side dtype must be one of {', '.join(SHARD_DTYPES)}, got {side_dtype!r}")
    if fp16 and side_dtype != "float16":
        raise EslmatchError(f"fp16=True contradicts side_dtype={side_dtype!r}")
    return side_dtype


def _shard_rows(shard_rows: int | None, count: int, dtype: str) -> int:
    """Rows per shard, 0 for the single-file (version 1) layout: ``None`` shards galleries of
    more than one shard (:data:`DEFAULT_SHARD_ROWS`) and int8 sides (which only version 3 stores)."""
    if shard_rows is None:
        return DEFAULT_SHARD_ROWS if count > DEFAULT_SHARD_ROWS or dtype == "int8" else 0
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 0:
        raise EslmatchError(f"shard_rows must be a non-negative integer, got {shard_rows!r}")
    if shard_rows == 0 and dtype == "int8":
        raise EslmatchError("an int8 side needs the sharded layout (shard_rows > 0)")
    return shard_rows


def _build_sharded(
    model: Any,
    src: ImageSource,
    out: Path,
    ids: list[str],
    paths: list[str],
    *,
    dtype: str,
    shard_rows: int,
    faiss_kind: str,
    faiss_options: ann.FaissOptions | None,
    batch_size: int,
    progress: bool,
    model_path: Any,
    text_model: Any,
    report: Report,
    job: ExtractJob,
) -> Path:
    """A version 3 (sharded) image index at ``out``, resumable, by one process or by the
    ranks of ``job`` together (see the module doc). Every stage is agreed by every rank
    (:meth:`ExtractJob.stage`): an error on one rank stops them all, reported once."""
    with job.stage("setup", report):  # (what can fail comes before any collective of a stage)
        record = _model_record(model, model_path, text_model)
        spec = {
            "action": "build",
            "version": SHARDED_VERSION,
            "fingerprint": record["fingerprint"],
            "dtype": dtype,
            "shard_rows": shard_rows,
            "width": src.regions,
            "total_dim": model.config.total_dim,
            **_source_spec(src, ids, paths),
        }
    staging = staging_dir(out)
    total = math.ceil(src.count / shard_rows)
    with job.stage("setup", report):
        digests = job.gather(_digest(spec))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise EslmatchError(
                f"rank {differ[0]} sees other inputs than rank 0 (model, features, ids, paths or options differ): "
                "every process must read the same files"
            )
    writer: _ShardWriter | None = None
    with job.stage("resume", report):
        if job.is_main:
            writer = _ShardWriter(staging, spec, report)
            if writer.done:
                report(f"eslmatch: resuming the build of {out}: {len(writer.done)} complete shards of {total} kept")
    done = set(job.broadcast(sorted(writer.done) if writer is not None else None))
    with job.stage("resume", report):
        if not job.is_main:
            writer = _ShardWriter(staging, spec, report, attach=True)
    assert writer is not None
    mine = deal([i for i in range(total) if i not in done], job.rank, job.world)
    try:
        with job.stage("encode", report):
            _encode_shards(model, src, writer, mine, 0, shard_rows, src.regions, batch_size, progress, job)
    except BaseException as exc:
        if job.is_main:
            writer.collect(range(total))  # those the other ranks completed
            if writer.done:
                report(f"eslmatch: note: {len(writer.done)} complete shards kept in {staging}: build again to resume")
            else:
                shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, JobFailed):
            job.gather(None)  # every rank is here: the others wait for rank 0's note
        raise
    with job.stage("write", report):
        if job.is_main:
            _finish_sharded(writer, out, src, ids, paths, record, total, shard_rows, faiss_kind, faiss_options)
    return out


def _finish_sharded(
    writer: _ShardWriter,
    out: Path,
    src: ImageSource,
    ids: list[str],
    paths: list[str],
    record: dict[str, Any],
    total: int,
    shard_rows: int,
    faiss_kind: str,
    faiss_options: ann.FaissOptions | None,
) -> None:
    """Rank 0 (or the one process) once every shard was written: the FAISS first stage, ids,
    paths and manifest, then the staging folder replaces ``out``."""
    missing = writer.collect(range(total))
    if missing:
        raise EslmatchError(
            f"{len(missing)} shard(s) reported written are missing from {writer.staging} (first: "
            f"{shard_name(missing[0])}): --out must be in one folder shared by every process"
        )
    dt = int(writer.spec["total_dim"])
    vectors = writer.vectors()
    opts = ann.resolve_options(faiss_kind, src.count, faiss_options, dt)
    faiss_index = ann.build(vectors, faiss_kind, opts)
    del vectors
    manifest = {
        "format": FORMAT,
        "version": SHARDED_VERSION,
        "stages": 2,
        "kind": "image",
        "created": _now(),
        "eslmatch_version": __version__,
        "model": record,
        "total_dim": dt,
        "width": src.regions,
        "count": src.count,
        "dtype": writer.spec["dtype"],
        "grid": list(src.grid) if src.grid else None,
        "faiss": {"kind": faiss_kind, "options": opts.to_dict(), "trained_on": src.count},
        "sources": [{**src.description, "count": src.count}],
        "shard_rows": shard_rows,
        "shards": writer.records,
    }
    _write_top_files(writer.staging, manifest, faiss_index, ids, paths)
    check_target(out)
    writer.finish(out)


def _write_top_files(
    folder: Path, manifest: dict[str, Any], faiss_index: Any, ids: list[str], paths: list[str]
) -> None:
    """FAISS index, ids, paths and (last) the manifest of a version 3 index."""
    ann.write(faiss_index, folder / FAISS)
    write_lines(folder / IDS, ids)
    write_lines(folder / PATHS, paths)
    manifest["files"] = file_records(folder, data_files("image", True, sharded=True))
    for name in manifest["files"]:
        _fsync_path(folder / name)
    write_manifest(folder, manifest)
    _fsync_path(folder / MANIFEST)


def _add_sharded(
    old: GalleryIndex,
    target: Path,
    model: Any,
    src: ImageSource,
    new_ids: list[str],
    new_paths: list[str],
    batch_size: int,
    progress: bool,
    report: Report,
) -> Path:
    """:func:`add_to_index` for a version 3 index: its shards are linked (not copied) into
    the staging folder, the new items appended as new shards (resumable), the FAISS index
    extended (or retrained: :func:`eslmatch.retrieval.ann.extend`), and the result replaces
    the index at the end."""
    m = old.manifest
    if src.regions > old.width:
        raise EslmatchError(
            f"the new images have {src.regions} regions, the sharded index {old.path} holds {old.width}: "
            "build a new index for them"
        )
    shard_rows = int(m.get("shard_rows") or DEFAULT_SHARD_ROWS)
    base = len(m["shards"])
    spec = {
        "action": "add",
        "to": _digest((target / MANIFEST).read_text(encoding="utf-8")),
        "fingerprint": old.fingerprint,
        "dtype": old.dtype,
        "shard_rows": shard_rows,
        "width": old.width,
        "total_dim": old.total_dim,
        **_source_spec(src, new_ids, new_paths),
    }
    staging = staging_dir(target)
    writer = _ShardWriter(staging, spec, report)
    for i in range(base):
        if i not in writer.done:
            writer.adopt(i, target, m["shards"][i])
    total = base + math.ceil(src.count / shard_rows)
    todo = [i for i in range(base, total) if i not in writer.done]
    try:
        _encode_shards(model, src, writer, todo, base, shard_rows, old.width, batch_size, progress, ExtractJob())
    except BaseException:
        if len(writer.done) > base:
            report(f"eslmatch: note: {len(writer.done) - base} new shards kept in {staging}: add again to resume")
        raise
    n = old.count + src.count
    vectors = writer.vectors()
    faiss_index, faiss_record = _grown_faiss(old, target, vectors, old.count)
    del vectors
    manifest = dict(m)
    manifest.update(
        count=n,
        modified=_now(),
        eslmatch_version=__version__,
        faiss=faiss_record,
        sources=[*m.get("sources", []), {**src.description, "count": src.count}],
        shards=writer.records,
    )
    if src.regions != old.width:
        manifest["grid"] = None
    ids_all, paths_all = old.ids + new_ids, old._paths + new_paths
    old.close()
    _write_top_files(staging, manifest, faiss_index, ids_all, paths_all)
    writer.finish(target)
    return target


def _link_index(src: Path, tmp: Path, manifest: dict[str, Any], skip: Sequence[str]) -> None:
    """Hard-link (or copy) every file of the index at ``src`` but ``skip`` into ``tmp``."""
    sharded = is_sharded(manifest)
    for name in data_files(manifest["kind"], manifest_has_side(manifest), sharded):
        if name not in skip:
            link_or_copy(src / name, tmp / name)
    if sharded:
        for shard in manifest["shards"]:
            (tmp / shard["dir"]).mkdir(parents=True)
            for name in (*shard_files(manifest["dtype"]), SHARD_RECORD):
                if (src / shard["dir"] / name).is_file():
                    link_or_copy(src / shard["dir"] / name, tmp / shard["dir"] / name)


# ---------------------------------------------------------------------- public API
def build_image_index(
    model: Any,
    features: Any,
    out: str | Path,
    *,
    split: str = "test",
    lengths: Any = None,
    ids: Sequence[Any] | None = None,
    paths: Sequence[Any] | None = None,
    images_dir: str | Path | None = None,
    grid: Sequence[int] | None = None,
    fp16: bool = False,
    faiss_kind: str = "flat",
    faiss_options: ann.FaissOptions | None = None,
    batch_size: int = 256,
    progress: bool = True,
    model_path: str | Path | None = None,
    text_model: str | None = None,
    device: Any = None,
    report: Report | None = None,
    side_dtype: str | None = None,
    shard_rows: int | None = None,
    job: ExtractJob | None = None,
) -> Path:
    """Build an image index at ``out``.

    A two-stage model (ESL) gets a two-stage index (side, lengths, first-stage vectors); a
    one-stage model (``model.exact_index``: VSE, ESL-CLIP) an exact one-stage index holding
    only its index vectors.

    Args:
        model: the model (eval mode is used; its mode is restored after).
        features: for a model of region features: a precomp dataset folder (``split`` of it),
            a :class:`PrecompSplit`, an ``.npy`` file or an array/tensor of region features
            ``(N, R, D)``, or an :class:`ImageSource`. For a model that takes pixels (it has
            ``preprocess``): a folder of photos, a Karpathy-split ``.json`` or captions
            ``.tsv`` (``split`` of it, its images under ``images_dir``), an
            :class:`~eslmatch.data.raw.ImageCaptionSplit` or a :class:`PhotoSource`.
        lengths: ``(N,)`` real regions per image (default: all ``R``).
        ids / paths: one per image (default: the split's ``{split}_ids.txt`` /
            ``{split}_images.txt``, else ``"0".."N-1"`` / empty; photos: their relative path
            without extension, or the split's image ids / the files).
        images_dir: folder of the image files, to resolve paths (see ``docs/retrieval.md``);
            for a split file of a model that takes pixels, the folder of its images.
        grid: ``(h, w)`` region grid (default: from ``extract_meta.json`` if present).
        fp16: store the image side ``(N, R, Dt)`` in float16 (half the disk; the global
            vectors stay float32). A one-stage index stores no side: ignored.
        faiss_kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        model_path: the model's directory or checkpoint, recorded so searches can load it.
        report: receives one line per photo that could not be read and is skipped, and the
            notes of a sharded build (default: printed on stderr); every skipped file is also
            named in the manifest.
        side_dtype: how the image side is stored: ``"float32"``, ``"float16"`` (= ``fp16``)
            or ``"int8"`` (a float32 scale per region vector; sharded layout only). Default:
            ``"float16"`` in the sharded layout, else from ``fp16``.
        shard_rows: items per shard of the sharded layout (format version 3, resumable
            build; :data:`DEFAULT_SHARD_ROWS`); ``0``: the single-file layout (version 1);
            ``None``: sharded when the gallery exceeds one shard or the side is int8.
        job: the processes building the index together under torchrun
            (:meth:`ExtractJob.join() <eslmatch.extract.distributed.ExtractJob.join>`; every
            rank calls this function with the same arguments): each rank encodes its share
            of the shards, rank 0 writes the rest; sharded layout of a two-stage model only.
            An error on any rank raises :class:`~eslmatch.extract.distributed.JobFailed` on
            every rank (reported once, by rank 0). Default: this process alone.
    Returns:
        ``out``.
    """
    job = job if job is not None else ExtractJob()
    report = (report or _warn) if job.is_main else _quiet
    progress = progress and job.is_main
    with job.stage("setup", report):
        out = _begin(model, out, faiss_kind, batch_size, device)
        if job.distributed and is_one_stage(model):
            raise EslmatchError(
                "under torchrun, index build writes sharded indexes of two-stage models only; this one-stage "
                "model's index is built in one process (without torchrun)"
            )
    if is_one_stage(model):
        return _build_one_stage_images(
            model,
            features,
            out,
            faiss_kind=faiss_kind,
            faiss_options=faiss_options,
            batch_size=batch_size,
            progress=progress,
            model_path=model_path,
            text_model=text_model,
            report=report,
            split=split,
            lengths=lengths,
            ids=ids,
            paths=paths,
            images_dir=images_dir,
        )
    with job.stage("setup", report):
        dtype = _side_dtype(fp16, side_dtype)
        src = _image_items(model, features, split, lengths, grid)
        item_ids = _ids(ids, src.ids, src.count, 0)
        item_paths = _paths(paths, src.paths, src.count, images_dir, item_ids)
        rows = _shard_rows(shard_rows, src.count, dtype)
        if job.distributed and not rows:
            raise EslmatchError(
                f"under torchrun, index build writes the sharded layout only, and these {src.count} images would "
                "be written unsharded: give --shard-rows N (N > 0), or build in one process"
            )
    if rows:
        return _build_sharded(
            model,
            src,
            out,
            item_ids,
            item_paths,
            dtype="float16" if side_dtype is None else dtype,  # sharded: compact by default
            shard_rows=rows,
            faiss_kind=faiss_kind,
            faiss_options=faiss_options,
            batch_size=batch_size,
            progress=progress,
            model_path=model_path,
            text_model=text_model,
            report=report,
            job=job,
        )
    dt = model.config.total_dim
    with atomic_dir(out) as tmp:
        arrays = _alloc(tmp, src.count, src.regions, dt, dtype)
        _encode_image_rows(model, src, arrays, 0, batch_size, progress)
        opts = ann.resolve_options(faiss_kind, src.count, faiss_options, dt)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "image",
            "created": _now(),
            "eslmatch_version": __version__,
            "model": _model_record(model, model_path, text_model),
            "total_dim": dt,
            "width": src.regions,
            "count": src.count,
            "dtype": dtype,
            "grid": list(src.grid) if src.grid else None,
            "faiss": {"kind": faiss_kind, "options": opts.to_dict(), "trained_on": src.count},
            "sources": [{**src.description, "count": src.count}],
        }
        faiss_index = ann.build(arrays[2], faiss_kind, opts)
        _finish(tmp, manifest, arrays, item_ids, item_paths, None, faiss_index)
    return out


def build_caption_index(
    model: Any,
    captions: Any,
    out: str | Path,
    *,
    split: str = "test",
    ids: Sequence[Any] | None = None,
    paths: Sequence[Any] | None = None,
    images_dir: str | Path | None = None,
    fp16: bool = False,
    faiss_kind: str = "flat",
    faiss_options: ann.FaissOptions | None = None,
    batch_size: int = 256,
    progress: bool = True,
    model_path: str | Path | None = None,
    text_model: str | None = None,
    device: Any = None,
) -> Path:
    """Build a caption index at ``out`` (for image -> text search).

    Args:
        captions: a list of strings, a ``.txt`` file (one caption per line), a precomp
            dataset folder (``split`` of it) / :class:`PrecompSplit`, or a raw-image split: a
            Karpathy-split ``.json`` / captions ``.tsv`` (with ``images_dir``, the folder of
            its images) or an :class:`~eslmatch.data.raw.ImageCaptionSplit`.
        ids: one per caption (default: ``IMAGEID#j`` when the split has image ids, else
            ``"0".."M-1"``).
        paths: one per caption, the image it describes (default: from the split, else empty).
    A two-stage index stores the caption level features ``(M, W, Dt)``; a one-stage index
    (``model.exact_index``) only the captions' index vectors (``fp16`` is then ignored).
    See :func:`build_image_index` for the other arguments.
    """
    out = _begin(model, out, faiss_kind, batch_size, device)
    src = caption_source(captions, split=split, images_dir=images_dir)
    m = len(src.captions)
    item_ids = _ids(ids, src.ids, m, 0)
    item_paths = _paths(paths, src.paths, m, None, item_ids)
    texts = [clean_line(" ".join(c.split()), "caption", i) for i, c in enumerate(src.captions)]
    tokens = tokenize_all(model, texts)
    if is_one_stage(model):
        with atomic_dir(out) as tmp:
            sink = _Vectors(tmp, m)
            _vector_caption_rows(model, tokens, sink, 0, batch_size, progress)
            vectors = sink.finish(m)
            opts = ann.resolve_options(faiss_kind, m, faiss_options, vectors.shape[1])
            manifest = _one_stage_manifest("caption", model, model_path, text_model, vectors, faiss_kind, opts)
            manifest["sources"] = [{**src.description, "count": m}]
            faiss_index = ann.build(vectors, faiss_kind, opts)
            _finish(tmp, manifest, (), item_ids, item_paths, texts, faiss_index)
        return out
    width = max(int(t.numel()) for t in tokens)
    dt = model.config.total_dim
    dtype = "float16" if fp16 else "float32"
    with atomic_dir(out) as tmp:
        arrays = _alloc(tmp, m, width, dt, dtype)
        _encode_caption_rows(model, tokens, arrays, 0, batch_size, progress)
        opts = ann.resolve_options(faiss_kind, m, faiss_options, dt)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "caption",
            "created": _now(),
            "eslmatch_version": __version__,
            "model": _model_record(model, model_path, text_model),
            "total_dim": dt,
            "width": width,
            "count": m,
            "dtype": dtype,
            "grid": None,
            "faiss": {"kind": faiss_kind, "options": opts.to_dict(), "trained_on": m},
            "sources": [{**src.description, "count": m}],
        }
        faiss_index = ann.build(arrays[2], faiss_kind, opts)
        _finish(tmp, manifest, arrays, item_ids, item_paths, texts, faiss_index)
    return out


def add_to_index(
    index_dir: str | Path,
    model: Any,
    features: Any,
    *,
    split: str = "test",
    lengths: Any = None,
    ids: Sequence[Any] | None = None,
    paths: Sequence[Any] | None = None,
    images_dir: str | Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
    device: Any = None,
    report: Report | None = None,
) -> Path:
    """Append items to an index (images to an image index, captions to a caption index),
    atomically.

    ``features`` is what :func:`build_image_index` / :func:`build_caption_index` take (for
    a model that takes pixels: a folder of photos or a split file, unreadable files skipped
    and named). The index is first verified in full (sha256 of every file; a sharded index:
    the sizes of its files) and must have been built by ``model``. Default ids continue the
    numbering (``str(count + i)``). Arrays are rewritten wider when the new items have more
    regions / words; the FAISS index grows in place (flat, HNSW) or is retrained (IVF,
    IVF-PQ: once the gallery is more than 4x what its clusters saw).

    A sharded (version 3) index keeps its shards (hard-linked into the new version, not
    copied) and gets the new items as new shards, written resumably like a sharded build:
    adding the same items again after a kill resumes. New images may have fewer regions than
    the index (padded), not more.
    """
    _check_batch(batch_size)
    target = Path(index_dir)
    _device(model, device)
    old = GalleryIndex.open(target, model=model, verify=not is_sharded(read_manifest(target)))
    if is_sharded(old.manifest):
        src = _image_items(model, features, split, lengths, None)
        new_ids = _ids(ids, src.ids, src.count, old.count, old.ids)
        new_paths = _paths(paths, src.paths, src.count, images_dir, new_ids)
        return _add_sharded(old, target, model, src, new_ids, new_paths, batch_size, progress, report or _warn)
    if old.one_stage:
        return _add_one_stage(
            old, target, model, features, split, lengths, ids, paths, images_dir, batch_size, progress, report or _warn
        )
    n_old, dt, dtype = old.count, old.total_dim, old.dtype
    grid = old.grid
    if old.kind == "image":
        src = _image_items(model, features, split, lengths, None)
        n_new, width = src.count, max(old.width, src.regions)
        if src.regions != old.width:
            grid = None
        new_ids = _ids(ids, src.ids, n_new, n_old, old.ids)
        new_paths = _paths(paths, src.paths, n_new, images_dir, new_ids)
        description = src.description
        texts = None
    else:
        csrc: CaptionSource = caption_source(features, split=split, images_dir=images_dir)
        n_new = len(csrc.captions)
        new_ids = _ids(ids, csrc.ids, n_new, n_old, old.ids)
        new_paths = _paths(paths, csrc.paths, n_new, None, new_ids)
        texts = [clean_line(" ".join(c.split()), "caption", i) for i, c in enumerate(csrc.captions)]
        tokens = tokenize_all(model, texts)
        width = max(old.width, max(int(t.numel()) for t in tokens))
        description = csrc.description
    n = n_old + n_new
    old.advise(random_access=False)  # copied in order
    with atomic_dir(target) as tmp:
        arrays = _alloc(tmp, n, width, dt, dtype)
        _copy_rows(old, arrays, n_old)
        if old.kind == "image":
            _encode_image_rows(model, src, arrays, n_old, batch_size, progress)
        else:
            _encode_caption_rows(model, tokens, arrays, n_old, batch_size, progress)
        faiss_index, faiss_record = _grown_faiss(old, target, arrays[2], n_old)
        manifest = dict(old.manifest)
        manifest.update(
            count=n,
            width=width,
            grid=list(grid) if grid else None,
            modified=_now(),
            eslmatch_version=__version__,
            faiss=faiss_record,
            sources=[*old.manifest.get("sources", []), {**description, "count": n_new}],
        )
        ids_all = old.ids + new_ids
        paths_all = old._paths + new_paths
        caps_all = None if texts is None else (old.captions or []) + texts
        old.close()
        _finish(tmp, manifest, arrays, ids_all, paths_all, caps_all, faiss_index)
    return target


def _grown_faiss(old: GalleryIndex, target: Path, vectors: Any, n_old: int) -> tuple[Any, dict[str, Any]]:
    """The index's FAISS index with ``vectors[n_old:]`` added (or retrained), and its record."""
    faiss_meta = old.manifest["faiss"]
    opts = ann.FaissOptions.from_dict(faiss_meta.get("options", {}))
    current = ann.faiss_module().read_index(str(target / FAISS))  # in memory: it grows
    faiss_index, opts, trained_on = ann.extend(
        current, old.faiss_kind, opts, vectors, n_old, int(faiss_meta.get("trained_on", n_old))
    )
    return faiss_index, {"kind": old.faiss_kind, "options": opts.to_dict(), "trained_on": trained_on}


def _add_one_stage(
    old: GalleryIndex,
    target: Path,
    model: Any,
    features: Any,
    split: str,
    lengths: Any,
    ids: Sequence[Any] | None,
    paths: Sequence[Any] | None,
    images_dir: Any,
    batch_size: int,
    progress: bool,
    report: Report,
) -> Path:
    """:func:`add_to_index` for a one-stage index: the old vectors, then the new ones (an
    index of an earlier eslmatch, version 1 with a side of one vector per item, is written
    anew in the current layout)."""
    n_old = old.count
    texts: list[str] | None = None
    if old.kind == "image":
        items = _NewImages(
            model,
            features,
            split=split,
            lengths=lengths,
            ids=ids,
            paths=paths,
            images_dir=images_dir,
            start=n_old,
            taken=old.ids,
        )
        capacity = n_old + items.count
    else:
        csrc = caption_source(features, split=split, images_dir=images_dir)
        new_ids = _ids(ids, csrc.ids, len(csrc.captions), n_old, old.ids)
        new_paths = _paths(paths, csrc.paths, len(csrc.captions), None, new_ids)
        texts = [clean_line(" ".join(c.split()), "caption", i) for i, c in enumerate(csrc.captions)]
        tokens = tokenize_all(model, texts)
        capacity = n_old + len(texts)
    old.advise(random_access=False)  # copied in order
    with atomic_dir(target) as tmp:
        sink = _Vectors(tmp, capacity, old.total_dim)
        step = max(1, _COPY_ROWS_BYTES // max(1, old.total_dim * 4))
        for i0 in range(0, n_old, step):
            i1 = min(i0 + step, n_old)
            sink.write(slice(i0, i1), old.global_vectors[i0:i1])
        if texts is None:
            record = items.encode(model, sink, n_old, batch_size, progress, report)
            new_ids, new_paths, n = items.ids, items.paths, n_old + items.count
        else:
            _vector_caption_rows(model, tokens, sink, n_old, batch_size, progress)
            record, n = {**csrc.description, "count": len(texts)}, capacity
        vectors = sink.finish(n)
        faiss_index, faiss_record = _grown_faiss(old, target, vectors, n_old)
        manifest = dict(old.manifest)
        manifest.update(
            version=ONE_STAGE_VERSION,
            stages=1,
            count=n,
            width=1,
            dtype="float32",
            grid=None,
            modified=_now(),
            eslmatch_version=__version__,
            faiss=faiss_record,
            sources=[*old.manifest.get("sources", []), record],
        )
        caps_all = None if texts is None else (old.captions or []) + texts
        ids_all, paths_all = old.ids + new_ids, old._paths + new_paths
        old.close()
        _finish(tmp, manifest, (), ids_all, paths_all, caps_all, faiss_index)
    return target


def rebuild_faiss(
    index_dir: str | Path,
    faiss_kind: str,
    faiss_options: ann.FaissOptions | None = None,
    out: str | Path | None = None,
) -> Path:
    """Rebuild only the FAISS index (e.g. ``flat`` -> ``hnsw``), atomically, of a two-stage
    or a one-stage index.

    The arrays are not re-encoded: they are hard-linked (or copied) into the new index, at
    ``out`` or in place of ``index_dir``.
    """
    ann.check_kind(faiss_kind)
    src = Path(index_dir)
    old = GalleryIndex.open(src)
    old.advise(random_access=False)  # read in order
    target = src if out is None else Path(out)
    if target != src:
        check_target(target)
    with atomic_dir(target) as tmp:
        _link_index(src, tmp, old.manifest, skip=(FAISS,))
        opts = ann.resolve_options(faiss_kind, old.count, faiss_options, old.total_dim)
        index = ann.build(old.global_vectors, faiss_kind, opts)
        ann.write(index, tmp / FAISS)
        manifest = dict(old.manifest)
        manifest.update(faiss={"kind": faiss_kind, "options": opts.to_dict(), "trained_on": old.count}, modified=_now())
        manifest["files"] = {**old.manifest["files"], **file_records(tmp, [FAISS])}
        write_manifest(tmp, manifest)
        old.close()
    return target
