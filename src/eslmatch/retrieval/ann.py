"""First-stage search: FAISS inner-product indexes over the global vectors ``(N, Dt)``.

``flat`` (``IndexFlatIP``) is exact. ``ivf`` (``IndexIVFFlat``, ``nlist ~ sqrt(N)`` clusters,
``nprobe`` of them searched) and ``hnsw`` (``IndexHNSWFlat`` with the inner-product metric)
trade a little recall of the shortlist for speed on large galleries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EslmatchError

FAISS_KINDS = ("flat", "ivf", "hnsw")
_ADD_CHUNK = 65536
_IVF_TRAIN_PER_LIST = 64
_IVF_RETRAIN_GROWTH = 4  # retrain the IVF clusters once the gallery is 4x what they saw


@dataclass
class FaissOptions:
    """Settings of the first-stage index (``None``: chosen from the gallery size).

    Attributes:
        nlist: IVF clusters (default ``round(sqrt(N))``).
        nprobe: IVF clusters searched per query (default ``max(16, nlist // 4)``, at most nlist).
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW search beam width (raised to the shortlist size when smaller).
        seed: seed of the IVF training sample.
    """

    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 256
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def relevant(self, kind: str) -> dict[str, Any]:
        """The settings that matter for ``kind``."""
        keys = {"flat": (), "ivf": ("nlist", "nprobe", "seed"), "hnsw": ("hnsw_m", "ef_construction", "ef_search")}[
            kind
        ]
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaissOptions:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of retrieval
        raise EslmatchError("the gallery index needs FAISS: pip install faiss-cpu") from exc
    return faiss


def check_kind(kind: str) -> str:
    if kind not in FAISS_KINDS:
        raise EslmatchError(f"unknown faiss index kind {kind!r}: choose one of {', '.join(FAISS_KINDS)}")
    return kind


def resolve_options(kind: str, n: int, options: FaissOptions | None) -> FaissOptions:
    """Fill the size-dependent defaults for a gallery of ``n`` vectors."""
    opts = replace(options) if options is not None else FaissOptions()
    if kind == "ivf":
        if opts.nlist is None:
            opts.nlist = max(1, round(math.sqrt(n)))
        opts.nlist = max(1, min(int(opts.nlist), n))
        if opts.nprobe is None:
            opts.nprobe = max(16, opts.nlist // 4)
        opts.nprobe = max(1, min(int(opts.nprobe), opts.nlist))
    return opts


def _add_chunks(index: Any, vectors: np.ndarray, start: int = 0) -> None:
    for i in range(start, vectors.shape[0], _ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[i : i + _ADD_CHUNK], dtype=np.float32))


def build(vectors: np.ndarray, kind: str, options: FaissOptions) -> Any:
    """A FAISS index of ``kind`` over ``vectors (N, Dt)`` (inner product)."""
    faiss = faiss_module()
    check_kind(kind)
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        assert options.hnsw_m is not None and options.ef_construction is not None  # resolve_options fills them
        index = faiss.IndexHNSWFlat(d, int(options.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(options.ef_construction)
    else:
        quantizer = faiss.IndexFlatIP(d)
        assert options.nlist is not None  # resolve_options fills it
        index = faiss.IndexIVFFlat(quantizer, d, int(options.nlist), faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small galleries: no warning, clusters still fine
        rng = np.random.default_rng(options.seed)
        n_train = min(n, max(int(options.nlist) * _IVF_TRAIN_PER_LIST, 1))
        rows = np.sort(rng.choice(n, size=n_train, replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    _add_chunks(index, vectors)
    return index


def extend(
    index: Any, kind: str, options: FaissOptions, vectors: np.ndarray, n_old: int, trained_on: int
) -> tuple[Any, FaissOptions, int]:
    """Add ``vectors[n_old:]`` to ``index``, rebuilding where its structure is outgrown.

    Returns ``(index, options, trained_on)``: an IVF index is retrained (new ``nlist`` from
    the new size unless it was set) once the gallery is 4x the size its clusters were
    trained on; flat and HNSW indexes grow in place.
    """
    n = vectors.shape[0]
    if kind == "ivf" and n > _IVF_RETRAIN_GROWTH * max(trained_on, 1):
        fresh = resolve_options(kind, n, FaissOptions(**{**options.to_dict(), "nlist": None, "nprobe": None}))
        return build(vectors, kind, fresh), fresh, n
    _add_chunks(index, vectors, n_old)
    return index, options, trained_on


def write(index: Any, path: Path) -> None:
    faiss_module().write_index(index, str(path))


def read(path: Path) -> Any:
    """Read a FAISS index, memory-mapping its vectors where FAISS can."""
    faiss = faiss_module()
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        pass
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise EslmatchError(f"{path}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})") from exc


def search(index: Any, kind: str, options: FaissOptions, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n`` inner products of each query ``(Q, Dt)`` -> ``(scores (Q, n), rows (Q, n))``.

    Rows are -1 where an approximate index found fewer than ``n`` candidates.
    """
    if kind == "ivf":
        index.nprobe = int(options.nprobe or 1)
    elif kind == "hnsw":
        index.hnsw.efSearch = max(int(options.ef_search), n)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    return scores, rows
