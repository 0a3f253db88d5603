"""What every write of a file gallery shares: the writer lock, garbage collection, the FAISS
file of a generation, and the one catalogue transaction that commits new items.

See :mod:`.store` for the operations and what makes each atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BusyError, EslmatchError, counted
from ...utils.choices import check_precision, check_runtime
from .. import ann
from ..encoding import FP32, Encoding, resolve_encoding
from ..layout import (
    FAISS_DIR,
    LOCK,
    SHARDS,
    SIDE_DTYPES,
    STAGING,
    Rows,
    faiss_name,
    file_records,
    fsync_path,
)
from ..metadata import Metadata, merge_types, now
from ..records import BuildSpec, FaissRecord, Layout, ModelRecord, ShardRecord, SourceRecord, StagedShard
from ..sources import CaptionSource, Source
from .catalog import Catalog
from .shards import BUILD_RECORD, ShardSink

if TYPE_CHECKING:
    from ...model.base import MatchingModel

DEFAULT_SHARD_ROWS = 65536
TAIL_MIN = 4096  # rows added after the FAISS index before it is extended (or N / 16, if more)
LOCK_TIMEOUT_S = 60.0
_COPY_BYTES = 64 << 20


@dataclass
class BuildOptions:
    """How a gallery is stored (``None``: chosen from the gallery's size).

    Attributes:
        faiss_kind: first stage: ``"auto"`` (flat up to :data:`~eslmatch.retrieval.ann.AUTO_FLAT_MAX`
            items, IVF-PQ above, re-chosen as the gallery grows), ``flat``, ``ivf``, ``hnsw``, ``ivfpq``.
        faiss: its settings.
        side_dtype: a two-stage gallery's sides: ``float32``, ``float16`` or ``int8`` (default
            float32 up to one shard, float16 above).
        shard_rows: items per shard (default 65,536).
        batch_size: items encoded at once.
        progress: show a progress bar.
        precision: the encoders' precision, ``auto``, ``fp32`` or ``bf16`` (``None``: fp32 for
            a build, the gallery's recorded precision for an add); see :mod:`eslmatch.utils.precision`.
        runtime: ``torch`` (default) or ``onnxruntime``: the model's exported encoders
            (``eslmatch export``), found at ``onnx`` or in ``MODEL/onnx``.
        onnx: the export folder for ``runtime="onnxruntime"``.
        encoding: the resolved :class:`~.encode.Encoding` (set by the gallery; wins when given).
    """

    faiss_kind: str = ann.AUTO
    faiss: ann.FaissOptions | None = None
    side_dtype: str | None = None
    shard_rows: int | None = None
    batch_size: int = 256
    progress: bool = True
    precision: str | None = None
    runtime: str = "torch"
    onnx: str | Path | None = None
    encoding: Encoding | None = None

    def check(self) -> None:
        ann.check_kind(self.faiss_kind, auto=True)
        if self.precision is not None:
            check_precision(self.precision)
        check_runtime(self.runtime)
        if self.side_dtype is not None and self.side_dtype not in SIDE_DTYPES:
            raise EslmatchError(f"side dtype must be one of {', '.join(SIDE_DTYPES)}, got {self.side_dtype!r}")
        rows = self.shard_rows
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise EslmatchError(f"shard_rows must be a positive integer, got {rows!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise EslmatchError(f"batch size must be a positive integer, got {self.batch_size!r}")


@dataclass
class AddReport:
    """What an add did: items added, ids already in the gallery (skipped or replaced), files
    that could not be read, and the live count afterwards."""

    added: int = 0
    duplicates: int = 0
    replaced: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0
    changed: int = 0  # library files re-encoded because they changed (library.py)
    moved: int = 0  # library files followed to a new place, not re-encoded
    excluded: int = 0  # library files left out: the user deleted their items

    def line(self, where: str, on_duplicate: str, seconds: float) -> str:
        """What ``index add`` says of it, in one line."""
        done = {"skip": "skipped", "replace": "replaced", "error": "refused"}[on_duplicate]
        parts = [f"{self.duplicates} already in the gallery ({done})"] if self.duplicates else []
        if self.changed and on_duplicate == "skip":
            parts.append(f"{counted(self.changed, 'file')} changed, re-encoded")
        if self.moved:
            parts.append(f"{counted(self.moved, 'file')} moved, followed")
        if self.excluded:
            parts.append(f"{counted(self.excluded, 'file')} you deleted left out (index restore brings them back)")
        if self.unreadable:
            parts.append(f"{counted(len(self.unreadable), 'unreadable file')} skipped")
        extra = "".join(f", {p}" for p in parts)
        return f"added {counted(self.added, 'item')} to {where}{extra} ({self.count} in all, {seconds:.1f} s)"


def _digest(spec: BuildSpec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------- locking and garbage
@contextlib.contextmanager
def write_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """The gallery's writer lock (``flock``: released by the kernel when a writer dies)."""
    with open(path / LOCK, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BusyError(f"{path}: another process is writing this gallery (waited {timeout:g} s)") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def collect_garbage(path: Path, layout: Mapping[str, Any], keep_staging: BuildSpec | None = None) -> None:
    """Remove what no committed layout names: shards, FAISS files, temporary files, and the
    staging folder unless it holds the write of ``keep_staging`` (its spec). Writers only.
    ``layout``: a :class:`~..records.Layout` (typed so once ``compact.py`` builds its new layouts as one)."""
    keep = {rec["dir"] for rec in layout.get("shards", [])}
    for sub, names in ((SHARDS, keep), (FAISS_DIR, {(layout.get("faiss") or {}).get("file")})):
        folder = path / sub
        for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
            if f"{sub}/{entry.name}" not in names:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    staging = path / STAGING
    if staging.exists():
        try:
            spec = json.loads((staging / BUILD_RECORD).read_text(encoding="utf-8")).get("spec")
        except (OSError, ValueError, AttributeError):
            spec = None
        if keep_staging is None or spec != json.loads(json.dumps(keep_staging, default=str)):
            shutil.rmtree(staging, ignore_errors=True)
    for entry in path.glob(".*.tmp-*"):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------- FAISS
def _faiss_record(
    path: Path, generation: int, index: ann.FaissIndex, kind: str, auto: bool, opts: ann.FaissOptions, trained_on: int
) -> FaissRecord:
    name = faiss_name(generation)
    (path / FAISS_DIR).mkdir(exist_ok=True)
    target = path / name
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    ann.write(index, tmp)
    fsync_path(tmp)
    os.replace(tmp, target)
    rec = file_records(path / FAISS_DIR, [target.name])[target.name]
    return {
        "file": name,
        "kind": kind,
        "auto": auto,
        "options": opts.to_dict(),
        "trained_on": int(trained_on),
        "rows": int(index.ntotal),
        **rec,
    }


def _new_faiss(
    path: Path, generation: int, vectors: Rows | None, kind: str, options: ann.FaissOptions | None
) -> FaissRecord | None:
    """A FAISS index of ``kind`` (``auto``: chosen from the size) over every row of ``vectors``."""
    if vectors is None:
        return None
    n, dim = vectors.shape
    chosen = ann.choose_kind(n) if kind == ann.AUTO else kind
    opts = ann.resolve_options(chosen, n, options, dim)
    return _faiss_record(path, generation, ann.build(vectors, chosen, opts), chosen, kind == ann.AUTO, opts, n)


def _grown_faiss(path: Path, generation: int, old: FaissRecord | None, vectors: Rows | None) -> FaissRecord | None:
    """The FAISS record after rows were added: the same file while the tail is small (it is
    searched exactly), else extended / retrained (``ann.extend``) or re-chosen (``auto``)."""
    if vectors is None:
        return None
    n = int(vectors.shape[0])
    if old is None:
        return _new_faiss(path, generation, vectors, ann.AUTO, None)
    covered = int(old["rows"])
    if n - covered <= max(TAIL_MIN, n // 16):
        return old.copy()
    kind = str(old["kind"])
    if old.get("auto") and ann.choose_kind(n) != kind:
        return _new_faiss(path, generation, vectors, ann.AUTO, None)
    opts = ann.FaissOptions.from_dict(old.get("options", {}))
    current = ann.faiss_module().read_index(str(path / old["file"]))  # in memory: it grows
    index, opts, trained_on = ann.extend(current, kind, opts, vectors, covered, int(old.get("trained_on", covered)))
    return _faiss_record(path, generation, index, kind, bool(old.get("auto")), opts, trained_on)


def _spec(
    model: MatchingModel,
    source: Source,
    record: ModelRecord,
    dtype: str,
    shard_rows: int,
    *,
    action: str,
    encoding: dict[str, str],
    base: int | None = None,
    replace: Sequence[int] = (),
) -> BuildSpec:
    """What a write's shards depend on (a resumed write keeps only shards of the same spec):
    ``record`` is the model record; an add names its first shard ``base`` and the rows it replaces."""
    fingerprint, stages = record["fingerprint"], record["stages"]
    total_dim = None if model.exact_index else int(model.config.total_dim)
    spec: BuildSpec = {
        "fingerprint": fingerprint,
        "stages": stages,
        "dtype": dtype,
        "shard_rows": shard_rows,
        "total_dim": total_dim,
        **source.identity(),
        "action": action,
        "encoding": encoding,
    }
    if base is not None:  # an add: its first shard and the rows it replaces
        spec["base"], spec["replace"] = base, list(replace)
    return spec


def encoding_of(model: MatchingModel, options: BuildOptions, default: Encoding = FP32) -> Encoding:
    """The encoding a write runs in: ``options.encoding`` when resolved, else its precision
    (``None``: ``default``) on the model's device, PyTorch."""
    if options.encoding is not None:
        return options.encoding
    return default if options.precision is None else resolve_encoding(options.precision, model.device)


def _side_dtype(model: MatchingModel, options: BuildOptions, count: int) -> str:
    if model.exact_index:
        return "float32"
    if options.side_dtype is not None:
        return options.side_dtype
    return "float16" if count > (options.shard_rows or DEFAULT_SHARD_ROWS) else "float32"


def _layout_shard(rec: StagedShard) -> ShardRecord:
    return {"dir": rec["dir"], "rows": rec["rows"], "width": rec["width"], "files": rec["files"]}


def _source_record(source: Source, stored: int, sink: ShardSink, how: Encoding = FP32) -> SourceRecord:
    skipped = [p for r in sink.writer.records for p in r["skipped"]]
    rec: SourceRecord = {**source.description, "count": stored, "encoding": how.record()}
    if skipped or getattr(source, "refused", None):
        names = getattr(source, "names", source.ids)
        listed = [{"file": names[p], "reason": "unreadable"} for p in skipped[:1000]]
        rec.update(skipped=len(skipped), skipped_files=listed)
    return rec


def _commit_items(
    catalog: Catalog,
    source: Source,
    kept: Sequence[int],
    start_row: int,
    layout: Layout,
    replaced: Sequence[int] = (),
) -> None:
    """One catalogue transaction: the new items (ids, paths, metadata, captions) at rows
    ``start_row + i``, the rows they replace marked deleted, the new layout."""
    metadata: list[Metadata] = []
    types = dict(catalog.types())
    for i in range(0, len(kept), 4096):
        part = source.metadata(kept[i : i + 4096])
        types = merge_types(types, ({"id": source.ids[p], **m} for p, m in zip(kept[i : i + 4096], part)))
        metadata += part
    captions = [source.texts[p] for p in kept] if isinstance(source, CaptionSource) else None
    with catalog.write():
        catalog.add_fields(types)
        if replaced:
            catalog.mark_deleted(replaced)
        catalog.insert(
            [start_row + i for i in range(len(kept))],
            [source.ids[p] for p in kept],
            [source.paths[p] for p in kept],
            metadata,
            now(),
            captions,
        )
        catalog.set_layout(layout)
