"""Talking to Milvus: the connection (failures as one line), a gallery's manifest (a property
of its collection), the first-stage index parameters, loading collections.

pymilvus is imported lazily (``pip install 'eslmatch[milvus]'``). See :mod:`.store`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import ModuleType
from typing import Any

import numpy as np

from ...errors import EslmatchError, Unavailable
from .. import ann
from ..layout import GalleryIndexError
from ..records import MilvusManifest

FORMAT = "eslmatch-milvus-gallery"
VERSION = 2
INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_TIMEOUT = 30.0
MAX_DIM = 32768  # Milvus's default largest vector (proxy.maxDimension)
MAX_TOPK = 16384  # Milvus's largest result of one search or query (quotaAndLimits topK)
LEVELS_SUFFIX = "_levels"
MANIFEST_KEY = "eslmatch.manifest"
KEY_STRIDE = 65536  # level entity key: row * KEY_STRIDE + chunk
MAX_ID_CHARS = 4096
MAX_PATH_CHARS = 65535
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_UNREACHABLE = ("unavailable", "fail connecting", "failed to connect", "retry timeout", "deadline")


class MilvusError(Unavailable):
    """Milvus could not be reached, or refused a request (one line, naming the server)."""


# ---------------------------------------------------------------------- connection
def require_pymilvus() -> ModuleType:
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


def pk(hit: Any, name: str) -> int:
    """The primary key of a search hit or query row (pymilvus spells it by field name or ``id``)."""
    value = hit.get(name) if hasattr(hit, "get") else None
    if value is None:
        value = hit["id"]
    return int(value)


def as_vector(value: Any, dtype: str) -> np.ndarray:
    """A returned vector as a 1-D array: FLOAT16_VECTOR comes back as bytes (or ``[bytes]``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (bytes, bytearray)):
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype=np.float16 if dtype == "float16" else np.float32)
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------- manifest
def read_manifest(conn: MilvusConnection, name: str) -> MilvusManifest | None:
    """The manifest of collection ``name`` (``None`` when there is no such collection)."""
    if not conn.call(f"looking up collection {name!r}", "has_collection", name):
        return None
    desc = conn.call(f"describing collection {name!r}", "describe_collection", name)
    raw = (desc.get("properties") or {}).get(MANIFEST_KEY)
    manifest: MilvusManifest | None
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
            f"supported by this eslmatch (supported: {VERSION}); rebuild it with 'eslmatch index build --milvus ... "
            "--overwrite'"
        )
    manifest["_fields"] = {f["name"]: f for f in desc.get("fields", [])}
    return manifest


def write_manifest(conn: MilvusConnection, name: str, manifest: MilvusManifest) -> None:
    clean = {k: v for k, v in manifest.items() if not k.startswith("_")}
    conn.call(
        f"updating collection {name!r}",
        "alter_collection_properties",
        name,
        properties={MANIFEST_KEY: json.dumps(clean, sort_keys=True, default=str)},
    )


def index_params(kind: str, n: int, opts: ann.FaissOptions | None) -> tuple[str, dict[str, int], ann.FaissOptions]:
    """``(Milvus index type, its build params, the search settings)`` for a first stage of
    ``kind`` over ``n`` items (the FAISS defaults: ``nlist ~ sqrt(N)``, ``nprobe = max(16, nlist / 4)``)."""
    if kind not in INDEX_KINDS:
        raise EslmatchError(
            f"the Milvus backend builds a {'/'.join(INDEX_KINDS)} first stage (Milvus FLAT, IVF_FLAT, HNSW), "
            f"not {kind!r}"
        )
    o = replace(opts) if opts is not None else ann.FaissOptions()
    if kind == "flat":
        return "FLAT", {}, o
    if kind == "ivf":
        o.nlist = int(o.nlist or max(1, min(65536, round(math.sqrt(max(n, 1))))))
        o.nprobe = int(min(o.nprobe or max(16, o.nlist // 4), o.nlist))
        return "IVF_FLAT", {"nlist": o.nlist}, o
    return "HNSW", {"M": int(o.hnsw_m), "efConstruction": int(o.ef_construction)}, o


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
