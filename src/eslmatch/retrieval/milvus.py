"""Gallery indexes in Milvus: stateless query servers over a shared, sharded store.

A Milvus gallery is the Milvus counterpart of an image index directory (see
``docs/milvus.md``). It lives in one or two collections of a Milvus server or cluster:

``NAME`` (one entity per image)
    ``row`` INT64 primary key (the image's position in the gallery source), ``item_id``
    VARCHAR, ``path`` VARCHAR, ``length`` INT32 (real regions; two-stage only) and ``vec``
    FLOAT_VECTOR: the first-stage vector ``(Dt,)`` of an ESL model, or the index vector
    ``(K,)`` of a single-vector model (VSE, ESL-CLIP), searched by inner product through a
    Milvus index (``FLAT``: exact; ``IVF_FLAT`` or ``HNSW`` for scale). The collection's
    property ``eslmatch.manifest`` holds the manifest (model record with its fingerprint,
    shapes, index settings, build state, sources).
``NAME_levels`` (two-stage only)
    the engine-ready image side (the re-rank's level features), ``chunk`` regions of
    ``Dt`` per entity (``chunk = 32768 // Dt``, Milvus's largest vector), so an image of
    ``R_i`` regions is ``ceil(R_i / chunk)`` entities: ``key`` INT64 primary key
    (``row * 65536 + c``), ``row`` INT64, ``vec`` FLOAT16_VECTOR (``fp16``, where the
    server has that type) or FLOAT_VECTOR ``(chunk * Dt,)``, zero beyond the image's regions.

:class:`MilvusGallery` is a :class:`~eslmatch.retrieval.GalleryIndex` whose first stage is a
Milvus search and whose level features are fetched from Milvus for the shortlist only; the
re-rank is :class:`GalleryIndex`'s own (``model.score_prepared`` on the fetched rows), so
the scores are those of a file index holding the same vectors. Query servers keep no state:
any number of them can serve one collection.

Builds write in batches with ``upsert`` (idempotent); a rerun of an interrupted build or
add finds the rows already stored (a scan of the primary keys) and writes only the others.
pymilvus is imported lazily (``pip install 'eslmatch[milvus]'``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import eval_mode
from ..errors import EslmatchError
from ..scoring import ScoringOptions
from . import ann
from .build import _model_record, _SourceItems
from .encode import encode_images, image_vectors, is_one_stage, model_kind, require_two_stage
from .index import GalleryIndex
from .sources import load_pixels
from .store import GalleryIndexError, model_fingerprint

FORMAT = "eslmatch-milvus-gallery"
VERSION = 1
INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_TIMEOUT = 30.0
MAX_DIM = 32768  # Milvus's default largest vector (proxy.maxDimension)
MAX_TOPK = 16384  # Milvus's largest result of one search or query (quotaAndLimits topK)
LEVELS_SUFFIX = "_levels"
MANIFEST_KEY = "eslmatch.manifest"
KEY_STRIDE = 65536  # level entity key: row * KEY_STRIDE + chunk
MAX_ID_CHARS = 4096
MAX_PATH_CHARS = 65535
REFRESH_S = 10.0  # how often a server re-reads the manifest (new items, a rebuilt collection)
_RPC_BYTES = 16 << 20  # payload of one upsert / get
_CACHE_ROWS = 65536
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_UNREACHABLE = ("unavailable", "fail connecting", "failed to connect", "retry timeout", "deadline")

Report = Callable[[str], None]


class MilvusError(EslmatchError):
    """Milvus could not be reached, or refused a request (one line, naming the server)."""

    http_status = 503  # what a web server answers: the service behind it is unavailable


# ---------------------------------------------------------------------- connection
def require_pymilvus() -> Any:
    """The ``pymilvus`` module, or a one-line error saying how to install it."""
    try:
        import pymilvus
    except ImportError as exc:
        raise EslmatchError(
            f"the Milvus backend needs pymilvus: pip install 'eslmatch[milvus]' ({exc.name} missing)"
        ) from None
    # pymilvus logs every failed call with a traceback; eslmatch reports them as one line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def check_collection_name(name: str) -> str:
    """``name`` if Milvus accepts it for a collection (letters, digits, ``_``; not a digit first)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EslmatchError(
            f"collection name {name!r} is not valid for Milvus: use letters, digits and '_' "
            "(not starting with a digit), at most 200 characters"
        )
    return name


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MilvusConnection:
    """A pymilvus client for ``uri`` whose failures are :class:`MilvusError` lines.

    ``timeout``: seconds each call may take, retries included (pymilvus retries a lost
    connection until then). ``token``: ``user:password`` or an API key (default: the
    ``MILVUS_TOKEN`` environment variable).
    """

    def __init__(self, uri: str, timeout: float = DEFAULT_TIMEOUT, token: str | None = None) -> None:
        if not isinstance(uri, str) or not (uri.endswith(".db") or re.match(r"[a-z][a-z0-9+.-]*://", uri)):
            raise EslmatchError(f"{uri!r} is not a Milvus URI (e.g. http://127.0.0.1:19530)")
        if not timeout or timeout <= 0:
            raise EslmatchError(f"the Milvus timeout must be positive, got {timeout!r}")
        self.uri, self.timeout = uri, float(timeout)
        pymilvus = require_pymilvus()
        self.DataType = pymilvus.DataType
        token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
        with self.rpc("connecting"):
            self.client = pymilvus.MilvusClient(uri=uri, token=token, timeout=self.timeout)

    @contextmanager
    def rpc(self, what: str) -> Iterator[None]:
        """Turn any failure of the calls inside into one :class:`MilvusError` line."""
        try:
            yield
        except EslmatchError:
            raise
        except Exception as exc:  # pymilvus, grpc and socket errors alike
            raise MilvusError(self.failure(what, exc)) from exc

    def failure(self, what: str, exc: BaseException) -> str:
        text = f"{exc} {getattr(exc, 'message', '')}".lower()
        if getattr(exc, "code", None) == 2 or any(word in text for word in _UNREACHABLE):
            hint = ": is the server running, and the URI right?" if what == "connecting" else ""
            return (
                f"cannot reach Milvus at {self.uri} while {what} (server unavailable; gave up after "
                f"{self.timeout:g} s){hint}"
            )
        return f"Milvus at {self.uri} refused {what}: {_first_line(exc)}"

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.method(*args, **kwargs, timeout=...)`` with errors as one line."""
        with self.rpc(what):
            return getattr(self.client, method)(*args, timeout=self.timeout, **kwargs)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: S110 - closing a dead connection
            pass


def _pk(hit: Any, name: str) -> int:
    """The primary key of a search hit or query row (pymilvus spells it by field name or ``id``)."""
    value = hit.get(name) if hasattr(hit, "get") else None
    if value is None:
        value = hit["id"]
    return int(value)


def _vector(value: Any, dtype: str) -> np.ndarray:
    """A returned vector as a 1-D array: FLOAT16_VECTOR comes back as bytes (or ``[bytes]``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (bytes, bytearray)):
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype=np.float16 if dtype == "float16" else np.float32)
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------- manifest
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _read_manifest(conn: MilvusConnection, name: str) -> dict[str, Any] | None:
    """The manifest of collection ``name`` (``None`` when there is no such collection)."""
    if not conn.call(f"looking up collection {name!r}", "has_collection", name):
        return None
    desc = conn.call(f"describing collection {name!r}", "describe_collection", name)
    raw = (desc.get("properties") or {}).get(MANIFEST_KEY)
    try:
        manifest = json.loads(raw) if raw else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryIndexError(
            f"collection {name!r} at {conn.uri} is not an eslmatch gallery (no {MANIFEST_KEY} property); "
            "choose another --collection"
        )
    if manifest.get("version") != VERSION:
        raise GalleryIndexError(
            f"collection {name!r} at {conn.uri}: eslmatch Milvus gallery version {manifest.get('version')!r} is not "
            f"supported by this eslmatch (supported: {VERSION}); rebuild it"
        )
    manifest["_fields"] = {f["name"]: f for f in desc.get("fields", [])}
    return manifest


def _write_manifest(conn: MilvusConnection, name: str, manifest: dict[str, Any]) -> None:
    clean = {k: v for k, v in manifest.items() if not k.startswith("_")}
    conn.call(
        f"updating collection {name!r}",
        "alter_collection_properties",
        name,
        properties={MANIFEST_KEY: json.dumps(clean, sort_keys=True, default=str)},
    )


def _index_params(kind: str, n: int, opts: ann.FaissOptions | None) -> tuple[str, dict[str, Any], ann.FaissOptions]:
    """``(Milvus index type, its build params, the search settings)`` for a first stage of
    ``kind`` over ``n`` items (the FAISS defaults: ``nlist ~ sqrt(N)``, ``nprobe = max(16, nlist / 4)``)."""
    if kind not in INDEX_KINDS:
        raise EslmatchError(
            f"the Milvus backend builds a {'/'.join(INDEX_KINDS)} first stage (Milvus FLAT, IVF_FLAT, HNSW), "
            f"not {kind!r}"
        )
    o = ann.FaissOptions(**(opts.to_dict() if opts is not None else {}))
    if kind == "flat":
        return "FLAT", {}, o
    if kind == "ivf":
        o.nlist = int(o.nlist or max(1, min(65536, round(math.sqrt(max(n, 1))))))
        o.nprobe = int(min(o.nprobe or max(16, o.nlist // 4), o.nlist))
        return "IVF_FLAT", {"nlist": o.nlist}, o
    return "HNSW", {"M": int(o.hnsw_m), "efConstruction": int(o.ef_construction)}, o


# ---------------------------------------------------------------------- items to write
class _Items(_SourceItems):
    """Images to write (see :class:`_SourceItems`), with the width and grid of their level
    features and a signature identifying this gallery source."""

    def __init__(self, model: Any, features: Any, **source: Any) -> None:
        super().__init__(model, features, **source)
        if self.photos is not None:
            self.width, self.grid = 1, None
            sample = "\n".join(str(f) for f in self.photos.files).encode()
        else:
            assert self.regions is not None
            self.width, self.grid = self.regions.regions, self.regions.grid
            n = self.count
            sample = b"".join(
                np.ascontiguousarray(self.regions.read(i, min(i + 2, n))).tobytes() for i in (0, max(0, n - 2))
            )
            if self.regions.lengths is not None:
                sample += np.asarray(self.regions.lengths, dtype=np.int64).tobytes()
        for i, p in enumerate(self.paths):
            if len(p) > MAX_PATH_CHARS:
                raise EslmatchError(f"path {i} is longer than {MAX_PATH_CHARS} characters (Milvus's VARCHAR limit)")
        for i, s in enumerate(self.ids):
            if len(s) > MAX_ID_CHARS:
                raise EslmatchError(f"id {i} is longer than {MAX_ID_CHARS} characters")
        h = hashlib.sha256(json.dumps(self.description, sort_keys=True, default=str).encode())
        h.update(f"{self.count}".encode())
        h.update("\n".join(self.ids).encode() + b"\0" + "\n".join(self.paths).encode() + b"\0" + sample)
        self.signature = h.hexdigest()
        self.refused: list[tuple[str, str]] = list(self.photos.refused) if self.photos is not None else []

    def encode(
        self, model: Any, i0: int, i1: int, two_stage: bool
    ) -> tuple[list[int], np.ndarray | None, np.ndarray | None, np.ndarray, list[tuple[str, str]]]:
        """Items ``[i0, i1)``: ``(kept positions, side (B, R, Dt) | None, lengths (B,) | None,
        vectors (B, K) float32, skipped (name, reason))``. Call inside ``eval_mode(model)``."""
        if self.photos is not None:
            pixels, kept, bad = load_pixels(self.photos, i0, i1, model.preprocess)
            if not pixels:
                return [], None, None, np.zeros((0, 0), np.float32), bad
            vec = image_vectors(model, torch.stack(pixels))
            return kept, None, None, vec.detach().float().cpu().numpy(), bad
        assert self.regions is not None
        lens = None if self.regions.lengths is None else self.regions.lengths[i0:i1]
        feats = self.regions.read(i0, i1)
        if not two_stage:
            vec = image_vectors(model, feats, lens)
            return list(range(i0, i1)), None, None, vec.detach().float().cpu().numpy(), []
        side, glob, lens_t = encode_images(model, feats, lens)
        return (
            list(range(i0, i1)),
            side.detach().float().cpu().numpy(),
            lens_t.cpu().numpy().astype(np.int64),
            glob.detach().float().cpu().numpy(),
            [],
        )


@dataclass
class MilvusWriteReport:
    """What a build or add did.

    Attributes:
        collection: the collection written.
        total: items of the source (positions ``start .. start + total - 1``).
        present: items already stored when this run started (a resumed run skips them).
        written: items written by this run.
        skipped: unreadable photos left out (named on stderr).
        count: items in the collection afterwards.
        up_to_date: the collection already held this complete gallery; nothing was written.
    """

    collection: str
    total: int
    present: int
    written: int
    skipped: int
    count: int
    up_to_date: bool = False


class _Writer:
    """Creates the collections of a gallery and upserts encoded rows into them."""

    def __init__(
        self,
        conn: MilvusConnection,
        name: str,
        manifest: dict[str, Any],
        shards: int | None = None,
        replicas: int | None = None,
    ) -> None:
        self.conn, self.name, self.manifest = conn, name, manifest
        self.shards, self.replicas = shards, replicas
        self.levels = name + LEVELS_SUFFIX
        self.two_stage = manifest["stages"] == 2

    # ----------------------------------------------------------------- schema
    def create(self, dim: int, fp16: bool, report: Report) -> None:
        """Create the collection(s) for vectors of width ``dim`` and record the manifest."""
        dt = self.conn.DataType
        m = self.manifest
        m["total_dim"] = int(dim)
        if dim > MAX_DIM:
            raise EslmatchError(f"vectors of width {dim} exceed Milvus's largest vector ({MAX_DIM})")
        pymilvus = require_pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", dt.INT64, is_primary=True)
        schema.add_field("item_id", dt.VARCHAR, max_length=MAX_ID_CHARS)
        schema.add_field("path", dt.VARCHAR, max_length=MAX_PATH_CHARS)
        if self.two_stage:
            schema.add_field("length", dt.INT32)
        schema.add_field("vec", dt.FLOAT_VECTOR, dim=int(dim))
        params = self.conn.client.prepare_index_params()
        stored = ann.FaissOptions.from_dict(m["index"].get("options", {}))
        kind, build_params, _ = _index_params(m["index"]["kind"], m["build"]["total"], stored)
        params.add_index(field_name="vec", index_type=kind, metric_type="IP", params=build_params)
        if self.two_stage:
            self._create_levels(dim, fp16, report)
        self.conn.call(
            f"creating collection {self.name!r}",
            "create_collection",
            self.name,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
            properties={MANIFEST_KEY: "{}"},
            **({"num_shards": int(self.shards)} if self.shards else {}),
        )
        _write_manifest(self.conn, self.name, m)
        self.load()

    def _create_levels(self, dt_dim: int, fp16: bool, report: Report) -> None:
        m = self.manifest
        chunk = max(1, min(m["width"], MAX_DIM // dt_dim))
        pymilvus = require_pymilvus()
        dt = self.conn.DataType
        if self.conn.call("looking up the level collection", "has_collection", self.levels):
            self.conn.call(f"dropping the stale {self.levels!r}", "drop_collection", self.levels)
        field_types = ["float16", "float32"] if fp16 else ["float32"]
        for field_type in field_types:
            schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", dt.INT64, is_primary=True)
            schema.add_field("row", dt.INT64)
            vtype = dt.FLOAT16_VECTOR if field_type == "float16" else dt.FLOAT_VECTOR
            schema.add_field("vec", vtype, dim=chunk * dt_dim)
            params = self.conn.client.prepare_index_params()
            params.add_index(field_name="vec", index_type="FLAT", metric_type="IP")  # never searched
            try:
                self.conn.call(
                    f"creating collection {self.levels!r}",
                    "create_collection",
                    self.levels,
                    schema=schema,
                    index_params=params,
                    consistency_level="Strong",
                    **({"num_shards": int(self.shards)} if self.shards else {}),
                )
            except MilvusError as exc:
                if field_type == "float16" and "float16" in str(exc).lower():
                    report(
                        f"eslmatch: note: this Milvus has no FLOAT16_VECTOR: the float16 level features are "
                        f"stored in a FLOAT_VECTOR field of {self.levels!r} (same values, twice the bytes)"
                    )
                    continue
                raise
            m["levels"] = {"collection": self.levels, "chunk": chunk, "field": field_type}
            return

    def load(self) -> None:
        names = (self.name, self.levels) if self.two_stage else (self.name,)
        load(self.conn, names, self.replicas)

    # ----------------------------------------------------------------- rows
    def present(self, start: int, stop: int) -> np.ndarray:
        """Rows in ``[start, stop)`` already stored (sorted int64), by a scan of the primary keys."""
        found: list[int] = []
        for a in range(start, stop, MAX_TOPK):
            b = min(a + MAX_TOPK, stop)
            rows = self.conn.call(
                f"reading the stored rows of {self.name!r}",
                "query",
                self.name,
                filter=f"row >= {a} and row < {b}",
                output_fields=["row"],
                limit=b - a,
            )
            found.extend(_pk(r, "row") for r in rows)
        return np.unique(np.asarray(found, dtype=np.int64))

    def upsert(
        self,
        rows: list[int],
        ids: list[str],
        paths: list[str],
        vec: np.ndarray,
        side: np.ndarray | None,
        lengths: np.ndarray | None,
    ) -> None:
        """Write items: their level entities first, then the main entity (so a stored main
        entity means a complete item)."""
        if self.two_stage:
            assert side is not None and lengths is not None
            lv = self.manifest["levels"]
            chunk, dt = int(lv["chunk"]), int(self.manifest["total_dim"])
            store = np.float16 if lv["field"] == "float16" else np.float32
            entities = []
            for j, row in enumerate(rows):
                n = int(lengths[j])
                for c in range(math.ceil(n / chunk)):
                    block = np.zeros((chunk, dt), dtype=np.float32)
                    part = side[j, c * chunk : min((c + 1) * chunk, n)]
                    block[: part.shape[0]] = part
                    if self.manifest["dtype"] == "float16":  # the precision asked, whatever the field
                        block = block.astype(np.float16).astype(np.float32)
                    entities.append({"key": row * KEY_STRIDE + c, "row": row, "vec": block.reshape(-1).astype(store)})
            self._send(self.levels, entities, chunk * dt * np.dtype(store).itemsize)
        main = []
        for j, row in enumerate(rows):
            e: dict[str, Any] = {"row": row, "item_id": ids[j], "path": paths[j], "vec": vec[j].astype(np.float32)}
            if self.two_stage:
                assert lengths is not None
                e["length"] = int(lengths[j])
            main.append(e)
        self._send(self.name, main, vec.shape[1] * 4 + 256)

    def _send(self, name: str, entities: list[dict[str, Any]], row_bytes: int) -> None:
        step = max(1, _RPC_BYTES // max(1, row_bytes))
        for i in range(0, len(entities), step):
            part = entities[i : i + step]
            first = part[0].get("row")
            self.conn.call(f"writing items from row {first} to {name!r}", "upsert", name, part)


def load(conn: MilvusConnection, names: Sequence[str], replicas: int | None = None) -> None:
    """Load collections into Milvus's query nodes: those not loaded yet (a loaded collection
    keeps its replicas), or all with ``replicas`` in-memory replicas each."""
    for name in names:
        if not replicas:
            state = conn.call(f"checking collection {name!r}", "get_load_state", name).get("state")
            if getattr(state, "name", str(state)) == "Loaded":
                continue
        extra = {"replica_number": int(replicas)} if replicas else {}
        conn.call(f"loading collection {name!r}", "load_collection", name, **extra)


def _reporter(report: Report | None) -> Report:
    if report is not None:
        return report
    return lambda message: print(message, file=sys.stderr, flush=True)


def _write_items(
    writer: _Writer,
    model: Any,
    items: _Items,
    start: int,
    batch_size: int,
    progress: bool,
    report: Report,
    fp16: bool,
    created: bool,
) -> tuple[int, int, int]:
    """Encode and upsert the items of ``items`` not yet stored at rows ``start + i``;
    returns ``(present, written, skipped)``. ``created``: the collection exists already."""
    done = writer.present(start, start + items.count) if created else np.zeros(0, np.int64)
    have = set((done - start).tolist())
    written = skipped = 0
    for name, why in items.refused:
        report(f"eslmatch: warning: skipping {name}: {why}")
    skipped += len(items.refused)
    with (
        eval_mode(model),
        tqdm(total=items.count, desc="images", disable=None if progress else True, leave=False, unit="item") as bar,
    ):
        for i0 in range(0, items.count, batch_size):
            i1 = min(i0 + batch_size, items.count)
            todo = [i for i in range(i0, i1) if i not in have]
            if not todo:
                bar.update(i1 - i0)
                continue
            kept, side, lens, vec, bad = items.encode(model, i0, i1, writer.two_stage)
            for name, why in bad:
                report(f"eslmatch: warning: skipping {name}: {why}")
            skipped += len(bad)
            if kept and not created:
                writer.create(vec.shape[1], fp16, report)
                created = True
            want = [j for j, i in enumerate(kept) if i not in have]
            if want:
                sel = np.asarray(want, dtype=np.int64)
                pos = [kept[j] for j in want]
                try:
                    writer.upsert(
                        [start + i for i in pos],
                        [items.ids[i] for i in pos],
                        [items.paths[i] for i in pos],
                        vec[sel],
                        None if side is None else side[sel],
                        None if lens is None else lens[sel],
                    )
                except MilvusError as exc:
                    stored = len(have) + written
                    raise MilvusError(
                        f"{exc}; {stored} of {items.count} items are stored: run the same command again to resume"
                    ) from exc
                written += len(want)
            bar.update(i1 - i0)
    if not created:
        first = f" (first: {items.refused[0][0]})" if items.refused else ""
        raise EslmatchError(f"no readable image among the {items.count} files{first}")
    return len(have), written, skipped


def _check_model_of(manifest: dict[str, Any], model: Any, where: str) -> None:
    """Refuse a model other than the one a Milvus gallery was built with, naming both."""
    recorded = manifest.get("model") or {}
    built_one = manifest.get("stages") == 1
    if is_one_stage(model) != built_one:
        built = "a single-vector model (one-stage)" if built_one else "an ESL model (two-stage)"
        raise GalleryIndexError(
            f"{where}: built by {built}, the given model is {model_kind(model)} (a different model)"
        )
    given = model_fingerprint(model)
    if given != recorded.get("fingerprint"):
        path = recorded.get("path") or "path not recorded"
        kind = (recorded.get("config") or {}).get("model_type") or "?"
        raise GalleryIndexError(
            f"{where}: built with another model ({kind} at {path}, fingerprint {str(recorded.get('fingerprint'))[:12]}) "
            f"than the given {model_kind(model)} model (fingerprint {given[:12]}); use that model or rebuild the collection"
        )


# ---------------------------------------------------------------------- public API: build / add
def build_milvus_image_index(
    model: Any,
    features: Any,
    uri: str,
    collection: str,
    *,
    split: str = "test",
    lengths: Any = None,
    ids: Sequence[Any] | None = None,
    paths: Sequence[Any] | None = None,
    images_dir: Any = None,
    grid: Sequence[int] | None = None,
    fp16: bool = False,
    index_kind: str = "flat",
    index_options: ann.FaissOptions | None = None,
    batch_size: int = 256,
    progress: bool = True,
    model_path: Any = None,
    text_model: str | None = None,
    device: Any = None,
    report: Report | None = None,
    overwrite: bool = False,
    shards: int | None = None,
    replicas: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> MilvusWriteReport:
    """Build an image gallery in Milvus collection ``collection`` at ``uri``, or resume an
    interrupted build of the same gallery.

    Takes what :func:`~eslmatch.retrieval.build_image_index` takes (``features``, ``split``,
    ``lengths``, ``ids``, ``paths``, ``images_dir``, ``grid``, ``model_path``, ...);
    ``index_kind`` is the Milvus index of the first stage (``"flat"``: exact, ``"ivf"``,
    ``"hnsw"``; ``index_options`` as :class:`FaissOptions`); ``fp16`` rounds the level
    features to float16 (a FLOAT16_VECTOR field where the server has one).

    A collection holding this complete gallery (same model, same source) is left as it is
    (``up_to_date``); one holding anything else is refused unless ``overwrite`` (then both
    collections are dropped and rebuilt). ``shards``: the collections' shards (Milvus's
    default when ``None``); ``replicas``: in-memory replicas to load them with (a cluster's
    query nodes; ``None`` leaves Milvus's default). A lost connection is one :class:`MilvusError`
    line; rerunning the same call resumes: rows already stored are not written again.
    """
    require_two_stage(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EslmatchError(f"batch size must be a positive integer, got {batch_size!r}")
    check_collection_name(collection)
    _index_params(index_kind, 1, index_options)
    say = _reporter(report)
    if device is not None:
        from ..utils import resolve_device

        model.to(resolve_device(device, model))
    two_stage = not is_one_stage(model)
    items = _Items(
        model,
        features,
        split=split,
        lengths=lengths,
        ids=ids,
        paths=paths,
        images_dir=images_dir,
        grid=grid,
        start=0,
    )
    record = _model_record(model, model_path, text_model)
    conn = MilvusConnection(uri, timeout, token)
    try:
        where = f"collection {collection!r} at {uri}"
        old = _read_manifest(conn, collection)
        if old is not None and not overwrite:
            same = old["build"].get("signature") == items.signature and old["build"].get("fp16") == bool(fp16)
            same = same and old["index"].get("kind") == index_kind
            _check_model_of(old, model, where)
            if not same:
                raise EslmatchError(
                    f"{where} already holds another gallery ({old['state']}, {old['count']} items); pass --overwrite "
                    "to replace it, or add items with 'eslmatch index add'"
                )
            if old["state"] == "complete":
                n = int(old["count"])
                return MilvusWriteReport(collection, items.count, n, 0, 0, n, up_to_date=True)
        if old is not None and overwrite:
            for name in (collection, collection + LEVELS_SUFFIX):
                if conn.call(f"looking up {name!r}", "has_collection", name):
                    conn.call(f"dropping {name!r}", "drop_collection", name)
            old = None
        if old is None:
            kind, _, opts = _index_params(index_kind, items.count, index_options)
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "version": VERSION,
                "kind": "image",
                "stages": 2 if two_stage else 1,
                "state": "building",
                "count": 0,
                "created": _now(),
                "eslmatch_version": __version__,
                "model": record,
                "total_dim": None,
                "width": items.width if two_stage else 1,
                "dtype": "float16" if fp16 and two_stage else "float32",
                "grid": list(items.grid) if items.grid else None,
                "index": {"kind": index_kind, "milvus": kind, "options": opts.to_dict()},
                "levels": None,
                "build": {
                    "id": uuid.uuid4().hex,
                    "signature": items.signature,
                    "fp16": bool(fp16),
                    "total": items.count,
                },
                "sources": [],
                "adding": None,
            }
        else:
            manifest = old
        writer = _Writer(conn, collection, manifest, shards, replicas)
        if old is not None:
            writer.load()
        present, written, skipped = _write_items(
            writer, model, items, 0, batch_size, progress, say, fp16, old is not None
        )
        count = present + written
        record_src = {**items.description, "count": count}
        if skipped:
            record_src["skipped"] = skipped
        manifest.update(state="complete", count=count, sources=[record_src], modified=_now())
        for name in (collection, writer.levels) if two_stage else (collection,):
            conn.call(f"flushing {name!r}", "flush", name)
        _write_manifest(conn, collection, manifest)
        return MilvusWriteReport(collection, items.count, present, written, skipped, count)
    finally:
        conn.close()


def add_to_milvus_index(
    uri: str,
    collection: str,
    model: Any,
    features: Any,
    *,
    split: str = "test",
    lengths: Any = None,
    ids: Sequence[Any] | None = None,
    paths: Sequence[Any] | None = None,
    images_dir: Any = None,
    batch_size: int = 256,
    progress: bool = True,
    device: Any = None,
    report: Report | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> MilvusWriteReport:
    """Append images to a complete Milvus gallery built by ``model`` (new rows follow the
    last; default ids continue the numbering). An interrupted add is resumed by the same
    call; another add is refused until it is finished. Servers see new items as they are
    written."""
    check_collection_name(collection)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EslmatchError(f"batch size must be a positive integer, got {batch_size!r}")
    say = _reporter(report)
    if device is not None:
        from ..utils import resolve_device

        model.to(resolve_device(device, model))
    conn = MilvusConnection(uri, timeout, token)
    try:
        where = f"collection {collection!r} at {uri}"
        manifest = _read_manifest(conn, collection)
        if manifest is None:
            raise GalleryIndexError(f"{where}: no such collection (build it with 'eslmatch index build --milvus')")
        _check_open(manifest, where)
        _check_model_of(manifest, model, where)
        pending = manifest.get("adding")
        start = int(pending["start"]) if pending else _next_row(manifest)
        items = _Items(
            model,
            features,
            split=split,
            lengths=lengths,
            ids=ids,
            paths=paths,
            images_dir=images_dir,
            grid=None,
            start=int(manifest["count"]),
        )
        if pending and pending.get("signature") != items.signature:
            raise EslmatchError(
                f"{where}: an interrupted add of other items ({pending.get('total')} from row {start}) must be "
                "finished first: rerun that 'eslmatch index add'"
            )
        writer = _Writer(conn, collection, manifest)
        writer.load()
        two_stage = manifest["stages"] == 2
        if two_stage:
            dt = int(model.config.total_dim)
            if dt != manifest["total_dim"]:
                raise GalleryIndexError(f"{where}: built with Dt={manifest['total_dim']}, the model has Dt={dt}")
        if not pending:
            _check_new_ids(conn, collection, items.ids)
            manifest["adding"] = {"signature": items.signature, "start": start, "total": items.count}
            _write_manifest(conn, collection, manifest)
        present, written, skipped = _write_items(
            writer, model, items, start, batch_size, progress, say, manifest.get("dtype") == "float16", True
        )
        added = present + written
        src = {**items.description, "count": added}
        if skipped:
            src["skipped"] = skipped
        manifest.update(
            count=int(manifest["count"]) + added,
            width=max(int(manifest["width"]), items.width) if two_stage else 1,
            grid=manifest.get("grid") if items.width == manifest.get("width") else None,
            sources=[*manifest.get("sources", []), src],
            adding=None,
            next_row=start + items.count,
            modified=_now(),
        )
        for name in (collection, writer.levels) if two_stage else (collection,):
            conn.call(f"flushing {name!r}", "flush", name)
        _write_manifest(conn, collection, manifest)
        return MilvusWriteReport(collection, items.count, present, written, skipped, int(manifest["count"]))
    finally:
        conn.close()


def _next_row(manifest: dict[str, Any]) -> int:
    """The first row free for new items (past every source position used so far)."""
    return int(manifest.get("next_row") or manifest["build"].get("total") or manifest["count"])


def _check_new_ids(conn: MilvusConnection, name: str, ids: list[str]) -> None:
    for i in range(0, len(ids), 1000):
        part = ids[i : i + 1000]
        expr = "item_id in [" + ", ".join(json.dumps(s, ensure_ascii=False) for s in part) + "]"
        rows = conn.call(
            f"checking ids in {name!r}", "query", name, filter=expr, output_fields=["item_id"], limit=len(part)
        )
        if rows:
            raise EslmatchError(
                f"duplicate id {rows[0]['item_id']!r}: collection {name!r} already holds it (ids must be unique; pass ids=)"
            )


def _check_open(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("state") != "complete":
        total = manifest.get("build", {}).get("total")
        raise GalleryIndexError(
            f"{where}: its build is unfinished (interrupted, or still running; {total} items planned): rerun the same "
            "'eslmatch index build' to resume it"
        )
    if manifest.get("kind") != "image":
        raise GalleryIndexError(f"{where}: a {manifest.get('kind')} gallery; the Milvus backend serves image galleries")


# ---------------------------------------------------------------------- searching
class _Column:
    """One field of the gallery's rows read lazily from Milvus: ``col[row]``, ``col[rows]``
    (an int array: an array of values) and ``len(col)``; what a search returned is cached."""

    def __init__(self, gallery: MilvusGallery, field: int) -> None:
        self.gallery, self.field = gallery, field

    def __len__(self) -> int:
        return self.gallery.count

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.gallery._records([int(key)])[int(key)][self.field]
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        recs = self.gallery._records(rows.tolist())
        values = [recs[int(r)][self.field] for r in rows]
        return np.asarray(values, dtype=np.int64) if self.field == 2 else values

    def __iter__(self) -> Iterator[Any]:
        for rec in self.gallery._scan():
            yield rec[self.field]


class _Side:
    """The stored image sides ``(N, R, Dt)`` read lazily from Milvus: ``side[row, :n]`` and
    ``side[rows]`` / ``side[rows, :w]`` (float32, zero beyond each image's regions)."""

    def __init__(self, gallery: MilvusGallery) -> None:
        self.gallery = gallery

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.gallery.count, self.gallery.width, self.gallery.total_dim)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: Any = slice(None)
        if isinstance(key, tuple):
            key, rest = key[0], (key[1] if len(key) > 1 else slice(None))
        single = isinstance(key, (int, np.integer)) and not isinstance(key, bool)
        rows = np.asarray([key] if single else key, dtype=np.int64).reshape(-1)
        block = self.gallery._levels(rows)[:, rest]
        return block[0] if single else block


class _Vectors:
    """The stored vectors ``(N, Dt)`` read lazily: ``vec[row]``, ``vec[rows]``."""

    def __init__(self, gallery: MilvusGallery) -> None:
        self.gallery = gallery

    def __getitem__(self, key: Any) -> np.ndarray:
        single = isinstance(key, (int, np.integer)) and not isinstance(key, bool)
        rows = np.asarray([key] if single else key, dtype=np.int64).reshape(-1)
        out = self.gallery._fetch_vectors(rows)
        return out[0] if single else out


class MilvusGallery(GalleryIndex):
    """An image gallery in Milvus, searched like a :class:`GalleryIndex` (same ``search_text``,
    ``search_texts``, ``attention``, ``lookup``, ``check_model``, ``image_path``, hits and
    scores): the first stage is a Milvus search, the re-rank GalleryIndex's own over level
    features fetched for the shortlist. Nothing is held locally but a cache of what recent
    searches returned; the manifest is re-read every :data:`REFRESH_S` seconds (new items
    appear; a collection rebuilt with another model is refused).

    Use :meth:`open`. ``ids``, ``lengths``, ``side`` and ``global_vectors`` are lazy views
    reading Milvus (iterating ``ids`` reads every row).
    """

    def __init__(self, conn: MilvusConnection, name: str, manifest: dict[str, Any]) -> None:  # noqa: D107
        # GalleryIndex.__init__ reads files; the attributes its search code uses are set here.
        self.conn, self.collection, self.where = conn, name, f"collection {name!r}"
        self.path = cast(Any, f"{conn.uri} collection {name!r}")
        self.scoring = ScoringOptions()
        self._checked: weakref.WeakSet = weakref.WeakSet()
        self._row = None
        self._faiss = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[str, str, int]] = OrderedDict()
        self._by_id: dict[str, int] = {}
        self.captions = None
        self.sharded = False  # file-layout attributes of GalleryIndex: not a sharded file index,
        self.side_scale = None  # no int8 scales (the level features are float16/float32)
        self.mapped_budget = None  # nothing memory-mapped: Milvus holds the data
        self._apply(manifest)
        self.ids = cast(list[str], _Column(self, 0))
        self._paths = cast(list[str], _Column(self, 1))
        self.lengths = cast(np.ndarray, _Column(self, 2)) if self.stages == 2 else None
        self.side = cast(np.ndarray, _Side(self)) if self.stages == 2 else None
        self.global_vectors = cast(np.ndarray, _Vectors(self))

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`MilvusConnection.call`; a collection found released (a restarted server that
        does not keep its load state) is loaded again and the call repeated once."""
        try:
            return self.conn.call(what, method, *args, **kwargs)
        except MilvusError as exc:
            text = str(exc).lower()
            if not any(word in text for word in ("not loaded", "released", "load()")):
                raise
        load(self.conn, self._collections())
        return self.conn.call(what, method, *args, **kwargs)

    def _collections(self) -> tuple[str, ...]:
        return (self.collection, self.collection + LEVELS_SUFFIX) if self.stages == 2 else (self.collection,)

    def _apply(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.stages = int(manifest["stages"])
        self.count = int(manifest["count"])
        self.total_dim = int(manifest["total_dim"])
        self.width = int(manifest["width"])
        self.dtype = str(manifest["dtype"])
        self.faiss_kind = str(manifest["index"]["kind"])
        old = getattr(self, "manifest_build", None)
        if old != manifest["build"]["id"]:  # a refresh keeps set_search_params's settings
            self.faiss_options = ann.FaissOptions.from_dict(manifest["index"].get("options", {}))
        self.manifest_build = manifest["build"]["id"]
        grid = manifest.get("grid")
        self.grid = (int(grid[0]), int(grid[1])) if grid else None
        self.levels = manifest.get("levels") or {}
        self._refreshed = time.monotonic()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(  # type: ignore[override]
        cls,
        uri: str,
        collection: str,
        model: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
    ) -> MilvusGallery:
        """Connect to ``uri`` and open ``collection`` (loading it into Milvus's memory).

        Raises :class:`MilvusError` when Milvus is unreachable, :class:`GalleryIndexError`
        when the collection is missing, not an eslmatch gallery, unfinished, or (with
        ``model``) built by another model.
        """
        check_collection_name(collection)
        conn = MilvusConnection(uri, timeout, token)
        where = f"collection {collection!r} at {uri}"
        manifest = _read_manifest(conn, collection)
        if manifest is None:
            conn.close()
            raise GalleryIndexError(f"{where}: no such collection (build it with 'eslmatch index build --milvus')")
        _check_open(manifest, where)
        gallery = cls(conn, collection, manifest)
        gallery._check_schema()
        load(conn, gallery._collections())
        if model is not None:
            gallery.check_model(model)
        return gallery

    def _check_schema(self) -> None:
        vec = self.manifest.get("_fields", {}).get("vec", {})
        dim = (vec.get("params") or {}).get("dim")
        if dim is not None and int(dim) != self.total_dim:
            raise GalleryIndexError(f"{self.path}: its vectors have width {dim}, the manifest says {self.total_dim}")

    def __repr__(self) -> str:
        return f"MilvusGallery({self.path}, stages={self.stages}, count={self.count}, index={self.faiss_kind})"

    @property
    def paths(self) -> list[str | None]:
        """Lazy (iterating reads every row)."""
        return cast(list[str | None], _Column(self, 1))

    def sample_paths(self, n: int = 200) -> list[str]:
        """Up to ``n`` recorded image paths (for a quick check that the images are where recorded)."""
        rows = self._call(
            f"reading image paths of {self.where}",
            "query",
            self.collection,
            filter="row >= 0",
            output_fields=["path"],
            limit=n,
        )
        return [str(r["path"]) for r in rows if r.get("path")]

    def close(self) -> None:
        """Close the connection (the collection stays in Milvus)."""
        self.conn.close()

    # ------------------------------------------------------------------ freshness
    def refresh(self, force: bool = False) -> None:
        """Re-read the manifest (at most every :data:`REFRESH_S` seconds unless ``force``):
        items added since appear; a collection rebuilt or dropped meanwhile is refused."""
        if not force and time.monotonic() - self._refreshed < REFRESH_S:
            return
        manifest = _read_manifest(self.conn, self.collection)
        if manifest is None:
            raise GalleryIndexError(f"{self.path}: the collection was dropped")
        _check_open(manifest, str(self.path))
        if manifest["build"]["id"] != self.manifest["build"]["id"]:
            with self._lock:
                self._cache.clear()
                self._by_id.clear()
            self._checked = weakref.WeakSet()  # the model is checked again
        self._apply(manifest)

    def check_model(self, model: Any) -> None:
        """Refuse a model other than the one the collection was built with (naming both)."""
        self.refresh()
        if model in self._checked:
            return
        _check_model_of(self.manifest, model, str(self.path))
        super().check_model(model)

    # ------------------------------------------------------------------ rows
    def _remember(self, rows: Sequence[int], recs: Sequence[tuple[str, str, int]]) -> None:
        with self._lock:
            for row, rec in zip(rows, recs):
                self._cache[int(row)] = rec
                self._cache.move_to_end(int(row))
                self._by_id[rec[0]] = int(row)
            while len(self._cache) > max(_CACHE_ROWS, 2 * len(rows)):
                _, old = self._cache.popitem(last=False)
                self._by_id.pop(old[0], None)

    def _records(self, rows: Sequence[int]) -> dict[int, tuple[str, str, int]]:
        """``{row: (id, path, length)}`` from the cache, the missing ones read from Milvus."""
        with self._lock:
            out = {r: self._cache[r] for r in rows if r in self._cache}
        missing = sorted({int(r) for r in rows} - out.keys())
        for i in range(0, len(missing), MAX_TOPK):
            part = missing[i : i + MAX_TOPK]
            got = self._call(
                f"reading items of {self.where}", "get", self.collection, ids=part, output_fields=self._meta_fields()
            )
            recs = {_pk(g, "row"): self._rec(g) for g in got}
            lost = [r for r in part if r not in recs]
            if lost:
                raise GalleryIndexError(f"{self.path}: no item at row {lost[0]}")
            self._remember(list(recs), list(recs.values()))
            out.update(recs)
        return out

    def _meta_fields(self) -> list[str]:
        return ["row", "item_id", "path", "length"] if self.stages == 2 else ["row", "item_id", "path"]

    @staticmethod
    def _rec(entity: Any) -> tuple[str, str, int]:
        e = entity.get("entity", entity)
        return str(e["item_id"]), str(e.get("path") or ""), int(e.get("length") or 1)

    def _scan(self) -> Iterator[tuple[str, str, int]]:
        """Every row's ``(id, path, length)`` in row order (reads the whole collection)."""
        last = -1
        while True:
            got = self._call(
                f"reading items of {self.where}",
                "query",
                self.collection,
                filter=f"row > {last}",
                output_fields=self._meta_fields(),
                limit=MAX_TOPK,
            )
            if not got:
                return
            got = sorted(got, key=lambda g: _pk(g, "row"))
            yield from (self._rec(g) for g in got)
            last = _pk(got[-1], "row")

    def row_of(self, item_id: str | int) -> int:
        """Row of the item with id ``item_id`` (one Milvus query unless a search returned it)."""
        key = str(item_id)
        with self._lock:
            row = self._by_id.get(key)
        if row is not None:
            return row
        got = self._call(
            f"looking up an id in {self.where}",
            "query",
            self.collection,
            filter=f"item_id in [{json.dumps(key, ensure_ascii=False)}]",
            output_fields=self._meta_fields(),
            limit=1,
        )
        if not got:
            raise EslmatchError(f"{self.path}: no item with id {key!r}")
        row = _pk(got[0], "row")
        self._remember([row], [self._rec(got[0])])
        return row

    def contains(self, item_id: str) -> bool:
        """Whether an item has id ``item_id``."""
        try:
            self.row_of(item_id)
        except (GalleryIndexError, MilvusError):
            raise
        except EslmatchError:
            return False
        return True

    def image_path(self, item_id: str | int) -> str | None:
        row = self.row_of(item_id)
        return self._records([row])[row][1] or None

    def _levels(self, rows: np.ndarray) -> np.ndarray:
        """Image sides ``(len(rows), R, Dt)`` float32 of ``rows`` (zero beyond each one's
        regions), from the level collection."""
        recs = self._records(rows.tolist())
        lens = [recs[int(r)][2] for r in rows]
        chunk, dt = int(self.levels["chunk"]), self.total_dim
        width = max([self.width, *lens]) if lens else self.width
        out = np.zeros((len(rows), width, dt), dtype=np.float32)
        keys = [int(r) * KEY_STRIDE + c for r, n in zip(rows, lens) for c in range(math.ceil(n / chunk))]
        step = max(1, min(MAX_TOPK, _RPC_BYTES // (chunk * dt * 4)))
        found: dict[int, np.ndarray] = {}
        for i in range(0, len(keys), step):
            got = self._call(
                f"reading level features from {self.collection + LEVELS_SUFFIX!r}",
                "get",
                self.collection + LEVELS_SUFFIX,
                ids=keys[i : i + step],
                output_fields=["key", "vec"],
            )
            for g in got:
                found[_pk(g, "key")] = _vector(g["vec"], self.levels.get("field", "float32"))
        where = {int(r): j for j, r in enumerate(rows)}
        for key in keys:
            v = found.get(key)
            row, c = divmod(key, KEY_STRIDE)
            if v is None or v.size != chunk * dt:
                raise GalleryIndexError(
                    f"{self.path}: the level features of item {recs[row][0]!r} are missing or damaged in "
                    f"{self.collection + LEVELS_SUFFIX!r}; rebuild the collection"
                )
            j = where[row]
            n = min(chunk, lens[j] - c * chunk)
            out[j, c * chunk : c * chunk + n] = v.reshape(chunk, dt)[:n]
        return out

    def _fetch_vectors(self, rows: np.ndarray) -> np.ndarray:
        got = self._call(
            f"reading vectors of {self.where}", "get", self.collection, ids=rows.tolist(), output_fields=["row", "vec"]
        )
        found = {_pk(g, "row"): _vector(g["vec"], "float32") for g in got}
        if any(int(r) not in found for r in rows):
            raise GalleryIndexError(f"{self.path}: no item at row {next(int(r) for r in rows if int(r) not in found)}")
        return np.stack([found[int(r)] for r in rows]).astype(np.float32)

    # ------------------------------------------------------------------ first stage
    def _ann(self) -> Any:
        raise EslmatchError(f"{self.path}: a Milvus gallery has no FAISS index (its first stage runs in Milvus)")

    def first_stage(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` for each query vector ``(Q, Dt)`` by inner product, searched in Milvus.

        Returns ``(scores (Q, n) float32, rows (Q, n) int64)``, rows -1 where fewer were
        found (an approximate index, or ``n`` beyond Milvus's :data:`MAX_TOPK`)."""
        q = self._query_matrix(queries)
        n = max(1, min(int(n), self.count))
        limit = min(n, MAX_TOPK)
        params: dict[str, Any] = {}
        if self.faiss_kind == "ivf":
            params["nprobe"] = int(self.faiss_options.nprobe or 16)
        elif self.faiss_kind == "hnsw":
            params["ef"] = max(int(self.faiss_options.ef_search), limit)
        scores = np.full((q.shape[0], n), -np.inf, dtype=np.float32)
        rows = np.full((q.shape[0], n), -1, dtype=np.int64)
        for b0 in range(0, q.shape[0], 256):
            res = self._call(
                f"searching {self.where}",
                "search",
                self.collection,
                data=[v for v in q[b0 : b0 + 256]],
                limit=limit,
                anns_field="vec",
                search_params={"metric_type": "IP", "params": params},
                output_fields=self._meta_fields()[1:],
            )
            for j, hits in enumerate(res):
                got_rows = [_pk(h, "row") for h in hits]
                self._remember(got_rows, [self._rec(h) for h in hits])
                scores[b0 + j, : len(got_rows)] = [float(h["distance"]) for h in hits]
                rows[b0 + j, : len(got_rows)] = got_rows
        return scores, rows

    def _top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One-stage search, deep enough that every item tied with the ``k``-th is a candidate
        (within Milvus's :data:`MAX_TOPK`)."""
        if k > MAX_TOPK:
            raise EslmatchError(f"Milvus returns at most {MAX_TOPK} results per search, k={k} asked")
        depth = min(k + 1, self.count, MAX_TOPK)
        while True:
            fs, rows = self.first_stage(queries, depth)
            if depth >= min(self.count, MAX_TOPK) or not np.any(fs[:, depth - 1] >= fs[:, k - 1]):
                return fs, rows
            depth = min(2 * depth, self.count, MAX_TOPK)


# ---------------------------------------------------------------------- describing
def describe_collection(uri: str, collection: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The manifest of an eslmatch gallery in Milvus (a dict; raises when there is none)."""
    check_collection_name(collection)
    conn = MilvusConnection(uri, timeout)
    try:
        manifest = _read_manifest(conn, collection)
    finally:
        conn.close()
    if manifest is None:
        raise GalleryIndexError(f"collection {collection!r} at {uri}: no such collection")
    return {k: v for k, v in manifest.items() if not k.startswith("_")}


__all__ = [
    "DEFAULT_TIMEOUT",
    "INDEX_KINDS",
    "MilvusConnection",
    "MilvusError",
    "MilvusGallery",
    "MilvusWriteReport",
    "add_to_milvus_index",
    "build_milvus_image_index",
    "check_collection_name",
    "describe_collection",
]
