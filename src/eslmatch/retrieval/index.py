"""Opening a gallery index and searching it: a FAISS shortlist, then ESL re-ranking; or, for
a one-stage index, FAISS alone.

Two-stage retrieval (as ALBEF/BLIP): the first stage ranks the whole gallery by the exact
inner product of the global vectors (the mean word-region affinity of each pair, spec
section 3); the ``rerank_k`` best are then scored with the full ESL score (attention pooling,
spec section 4, through :func:`eslmatch.scoring.score_tiles`) and the ``k`` best by that
score are returned.

One-stage retrieval (models with ``exact_index``: VSE, ESL-CLIP): the inner product of the
index vectors IS the model's score, so FAISS's ranking is the answer (exact with ``flat``);
``rerank_k`` is ignored and ``Hit.score == Hit.first_stage_score``.

Rules for ``k`` and ``rerank_k`` (gallery of ``N`` items, two-stage):

- ``k`` must be >= 1; ``k > N`` returns all ``N``;
- ``rerank_k <= 0`` (or ``None``): first stage only, ``Hit.score`` is the first-stage score;
- ``0 < rerank_k < k`` is raised to ``k`` (every returned hit is ESL-scored);
- ``rerank_k >= N`` scores the whole gallery: the exhaustive ESL ranking.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import eval_mode
from ..data.files import SkipImage, open_image, to_rgb
from ..errors import EslmatchError
from ..scoring import ScoringOptions
from . import ann
from .encode import (
    caption_vectors,
    caption_words,
    encode_images,
    encode_token_batch,
    image_vectors,
    is_one_stage,
    model_kind,
    require_two_stage,
    takes_pixels,
    tokenize_all,
)
from .store import (
    CAPTIONS,
    FAISS,
    GLOBAL,
    IDS,
    LENGTHS,
    PATHS,
    SCALE,
    SIDE,
    GalleryIndexError,
    ShardedArray,
    advise,
    check_files,
    is_sharded,
    manifest_has_side,
    manifest_stages,
    model_fingerprint,
    open_array,
    prefetch,
    read_lines,
    read_manifest,
    read_rows,
    release,
)

QUERY_BATCH = 64
# Bytes of memory-mapped rows a search may leave mapped in the process before the maps are
# released (their pages stay in the page cache): bounds the file-backed part of its RSS.
MAPPED_BUDGET = 256 << 20
_PAGE = 4096
_FAULT_AROUND = 65536  # Linux maps up to 64 KB of cached pages around each page fault


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        rank: 1-based position in the result list.
        id: the item's id (``ids.txt``).
        path: image path (of the image, or of the caption's image), ``None`` when unknown.
        score: the ESL score (the first-stage score when re-ranking is off); for a one-stage
            index the inner product of the index vectors, which is the model's score.
        first_stage_score: the global inner product (mean word-region affinity; for a
            one-stage index the same as ``score``).
        index: the item's row in the index.
        caption: the caption text (caption indexes only).
    """

    rank: int
    id: str
    path: str | None
    score: float
    first_stage_score: float
    index: int
    caption: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("rank", "id", "path", "score", "first_stage_score", "index")}
        if self.caption is not None:
            out["caption"] = self.caption
        return out


@dataclass(frozen=True)
class ImageEntry:
    """A stored image of an image index, usable as a query on a caption index.

    Attributes:
        side: engine-ready image side ``(R_i, Dt)`` float32 (real regions only); ``None`` for
            a one-stage index, which stores only vectors.
        global_vector: first-stage vector ``(Dt,)`` float32 (a one-stage index: the image's
            index vector).
    """

    id: str
    path: str | None
    row: int
    side: np.ndarray | None
    global_vector: np.ndarray
    fingerprint: str


def plan_depth(k: int, rerank_k: int | None, n: int) -> tuple[int, int, bool]:
    """``(k, shortlist size, re-rank?)`` for a gallery of ``n`` (rules in the module doc)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise EslmatchError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), n)
    if rerank_k is None or rerank_k <= 0:
        return k, k, False
    return k, min(max(int(rerank_k), k), n), True


class _RowReader:
    """``reader[rows]``: rows of an on-disk array read with ``pread`` (:func:`read_rows`)."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return read_rows(self.arr, rows)


def _file_resident() -> int | None:
    """Bytes of file-backed memory resident in this process (``/proc/self/statm``), or ``None``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _Clock:
    """Adds the seconds since the last lap to ``timings[name]`` (no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


class GalleryIndex:
    """A gallery index opened from disk; arrays are memory-mapped (opening reads no data).

    Use :meth:`open`. Attributes of note: :attr:`kind` (``"image"`` or ``"caption"``),
    :attr:`stages` (1: one-stage, exact; 2: shortlist + ESL re-rank), :attr:`ids`,
    :attr:`count`, :attr:`grid`, :attr:`manifest`. A one-stage index has no :attr:`side` and
    no :attr:`lengths` (``None``). In a sharded (version 3) index :attr:`side`,
    :attr:`lengths`, :attr:`global_vectors` (and :attr:`side_scale`, ``(N, R)`` float32 for an
    int8 side, else ``None``) are :class:`~eslmatch.retrieval.store.ShardedArray` views over
    the memory-mapped shards.

    Memory: opening maps the arrays without reading them, and a search reads only the rows
    it re-ranks (``rerank_k`` sides, and for ``ivfpq`` the global vectors of its candidates):
    the side, scale and global maps are advised ``MADV_RANDOM`` (no read-ahead; see
    :meth:`advise`). Those pages are file-backed (the page cache, reclaimable), so the
    process's own (anonymous) memory is the model, the FAISS index, the ids and paths.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.stages: int = manifest_stages(manifest)
        self.count: int = manifest["count"]
        self.total_dim: int = manifest["total_dim"]
        self.width: int = manifest["width"]
        self.dtype: str = manifest["dtype"]
        self.faiss_kind: str = manifest["faiss"].get("kind", "flat")
        self.faiss_options = ann.FaissOptions.from_dict(manifest["faiss"].get("options", {}))
        grid = manifest.get("grid")
        self.grid: tuple[int, int] | None = (int(grid[0]), int(grid[1])) if grid else None
        has_side = manifest_has_side(manifest)
        self.sharded = is_sharded(manifest)
        self.side: Any = None
        self.lengths: Any = None
        self.side_scale: Any = None
        if self.sharded:
            folders = [path / shard["dir"] for shard in manifest["shards"]]
            self.side = ShardedArray([open_array(f / SIDE, True) for f in folders])
            self.lengths = ShardedArray([open_array(f / LENGTHS) for f in folders])
            self.global_vectors: Any = ShardedArray([open_array(f / GLOBAL, True) for f in folders])
            if self.dtype == "int8":
                self.side_scale = ShardedArray([open_array(f / SCALE, True) for f in folders])
        else:
            self.side = open_array(path / SIDE, True) if has_side else None
            self.lengths = open_array(path / LENGTHS) if has_side else None
            self.global_vectors = open_array(path / GLOBAL, True)
        self.ids: list[str] = read_lines(path / IDS, self.count)
        self._paths: list[str] = read_lines(path / PATHS, self.count)
        self.captions: list[str] | None = read_lines(path / CAPTIONS, self.count) if self.kind == "caption" else None
        self._check_shapes()
        self._row: dict[str, int] | None = None
        self._faiss: Any = None
        # How the re-rank's engine runs (budget, precision, workers); set it to change them.
        self.scoring = ScoringOptions()
        self._checked: weakref.WeakSet = weakref.WeakSet()
        # Bytes of mapped rows read before release_pages() runs (None: never); see MAPPED_BUDGET.
        self.mapped_budget: int | None = MAPPED_BUDGET
        self._mapped = 0
        self._resident_base: int | None = _file_resident()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, model: Any = None, verify: bool = False) -> GalleryIndex:
        """Open the index at ``path``.

        Every file's presence and size are checked (and its sha256 with ``verify=True``, a
        full read); shapes must agree with the manifest; with ``model``, the model's
        fingerprint must equal the one the index was built with. Failures raise
        :class:`GalleryIndexError` naming the file at fault.
        """
        p = Path(path)
        manifest = read_manifest(p)
        check_files(p, manifest, verify)
        index = cls(p, manifest)
        if model is not None:
            index.check_model(model)
        return index

    @property
    def one_stage(self) -> bool:
        """True for a one-stage index (exact inner product, no re-rank)."""
        return self.stages == 1

    def _check_shard_shapes(self) -> None:
        """Each shard's arrays have the shapes and dtypes its manifest record implies."""
        w, dt = self.width, self.total_dim
        for i, shard in enumerate(self.manifest["shards"]):
            n = int(shard["rows"])
            want: list[tuple[str, Any, tuple[int, ...], str]] = [
                (SIDE, self.side.parts[i], (n, w, dt), self.dtype),
                (LENGTHS, self.lengths.parts[i], (n,), ""),
                (GLOBAL, self.global_vectors.parts[i], (n, dt), "float32"),
            ]
            if self.side_scale is not None:
                want.append((SCALE, self.side_scale.parts[i], (n, w), "float32"))
            for name, arr, shape, dtype in want:
                where = self.path / shard["dir"] / name
                if tuple(arr.shape) != shape:
                    raise GalleryIndexError(f"{where}: shape {tuple(arr.shape)}, the manifest implies {shape}")
                if dtype and arr.dtype != np.dtype(dtype):
                    raise GalleryIndexError(f"{where}: dtype {arr.dtype}, the manifest says {dtype}")
                if not dtype and not np.issubdtype(arr.dtype, np.integer):
                    raise GalleryIndexError(f"{where}: lengths must be integers, got {arr.dtype}")
            lens = self.lengths.parts[i]
            lo, hi = int(lens.min()), int(lens.max())
            if lo < 1 or hi > w:
                raise GalleryIndexError(
                    f"{self.path / shard['dir'] / LENGTHS}: lengths span {lo}..{hi}, outside 1..{w}"
                )

    def _check_shapes(self) -> None:
        if self.sharded:
            self._check_shard_shapes()
            return
        n, w, dt = self.count, self.width, self.total_dim
        want = {SIDE: ((n, w, dt), self.dtype), LENGTHS: ((n,), None), GLOBAL: ((n, dt), "float32")}
        arrays: tuple[tuple[str, np.ndarray], ...]
        if self.side is None or self.lengths is None:
            if w != 1:
                raise GalleryIndexError(f"{self.path}: a one-stage index has width 1 (one vector per item), not {w}")
            arrays = ((GLOBAL, self.global_vectors),)
        else:
            arrays = ((SIDE, self.side), (LENGTHS, self.lengths), (GLOBAL, self.global_vectors))
        for name, arr in arrays:
            shape, dtype = want[name]
            if tuple(arr.shape) != shape:
                raise GalleryIndexError(f"{self.path / name}: shape {tuple(arr.shape)}, the manifest implies {shape}")
            if dtype is not None and arr.dtype != np.dtype(dtype):
                raise GalleryIndexError(f"{self.path / name}: dtype {arr.dtype}, the manifest says {dtype}")
        if self.lengths is None:
            return
        if not np.issubdtype(self.lengths.dtype, np.integer):
            raise GalleryIndexError(f"{self.path / LENGTHS}: lengths must be integers, got {self.lengths.dtype}")
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo < 1 or hi > w:
            raise GalleryIndexError(f"{self.path / LENGTHS}: lengths span {lo}..{hi}, outside 1..{w}")

    # ------------------------------------------------------------------ metadata
    @property
    def fingerprint(self) -> str:
        return str(self.manifest["model"].get("fingerprint", ""))

    @property
    def model_path(self) -> str | None:
        """The model directory (or checkpoint) recorded at build time, if any."""
        return self.manifest["model"].get("path")

    @property
    def paths(self) -> list[str | None]:
        return [p or None for p in self._paths]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({str(self.path)!r}, kind={self.kind}, stages={self.stages}, count={self.count}, "
            f"faiss={self.faiss_kind})"
        )

    def row_of(self, item_id: str | int) -> int:
        """Row of the item with id ``item_id``."""
        if self._row is None:
            self._row = {s: i for i, s in enumerate(self.ids)}
        try:
            return self._row[str(item_id)]
        except KeyError:
            raise EslmatchError(f"{self.path}: no item with id {str(item_id)!r}") from None

    def image_path(self, item_id: str | int) -> str | None:
        """Image path of an item (of the caption's image for caption indexes), ``None`` if unknown."""
        return self._paths[self.row_of(item_id)] or None

    def caption(self, item_id: str | int) -> str:
        """Caption text of an item of a caption index."""
        self._need("caption", "caption")
        assert self.captions is not None
        return self.captions[self.row_of(item_id)]

    def lookup(self, item_id: str | int) -> ImageEntry:
        """A stored image (image index) by id, ready to query a caption index."""
        self._need("image", "lookup")
        row = self.row_of(item_id)
        side = None
        if self.side is not None and self.lengths is not None and not self.one_stage:
            side = self._side_row(row)
        return ImageEntry(
            self.ids[row],
            self._paths[row] or None,
            row,
            side,
            np.array(self.global_vectors[row], dtype=np.float32),
            self.fingerprint,
        )

    def advise(self, random_access: bool) -> None:
        """Read-ahead of the side, scale and global maps: off (``True``, the default after
        :meth:`open`: searches read scattered rows) or on (``False``: before reading them in order)."""
        for arr in (self.side, self.side_scale, self.global_vectors):
            if arr is not None:
                advise(arr, random_access)

    def release_pages(self) -> None:
        """Unmap the pages of the side, scale and global maps that searches touched (they
        stay in the page cache). Runs by itself once ``mapped_budget`` bytes of rows were read."""
        for arr in (self.side, self.side_scale, self.global_vectors):
            if arr is not None:
                release(arr)
        self._mapped = 0
        self._resident_base = _file_resident()

    def _touched(self, rows: int, row_bytes: int) -> None:
        """After reading ``rows`` scattered rows of ``row_bytes`` from the maps: release them once
        the process's file-backed resident memory grew by more than ``mapped_budget`` since the
        last release (Linux: ``/proc/self/statm``; a fault maps up to a whole page-cache folio,
        so rows say little). Elsewhere the rows read are counted, 64 KB more each."""
        if self.mapped_budget is None:
            return
        now = _file_resident()
        if now is None:
            self._mapped += rows * (-(-row_bytes // _PAGE) * _PAGE + _FAULT_AROUND)
            grown = self._mapped
        else:
            if self._resident_base is None:
                self._resident_base = now
            grown = now - self._resident_base
        if grown > self.mapped_budget:
            self.release_pages()

    def _side_row(self, row: int) -> np.ndarray:
        """The stored side of one item, real regions only: ``(R_i, Dt)`` float32."""
        n = int(self.lengths[row])
        side = np.array(self.side[row, :n], dtype=np.float32)
        if self.side_scale is not None:
            side *= np.asarray(self.side_scale[row, :n], dtype=np.float32)[:, None]
        return side

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise EslmatchError(f"{self.path}: {what} needs an {kind} index, this is a {self.kind} index")

    def _need_two_stage(self, what: str) -> None:
        if self.one_stage:
            raise EslmatchError(
                f"{self.path}: {what} needs a two-stage (ESL) index; this one is one-stage: it stores one "
                "vector per item, whose inner product is the score"
            )

    # ------------------------------------------------------------------ model check
    def check_model(self, model: Any) -> None:
        """Refuse a model other than the one the index was built with (checked once per model)."""
        if model in self._checked:
            return
        if is_one_stage(model) != self.one_stage:
            built = "a single-vector model (one-stage)" if self.one_stage else "an ESL model (two-stage)"
            raise GalleryIndexError(
                f"{self.path}: built by {built}, the given model is {model_kind(model)} (a different model)"
            )
        require_two_stage(model)
        if not self.one_stage:  # one-stage: the width of the vectors is checked on each query
            dt = model.config.total_dim
            if dt != self.total_dim:
                raise GalleryIndexError(
                    f"{self.path}: built by a model with Dt={self.total_dim}, the given model has Dt={dt} "
                    "(a different model)"
                )
        if model_fingerprint(model) != self.fingerprint:
            where = f" ({self.model_path})" if self.model_path else ""
            raise GalleryIndexError(
                f"{self.path}: built with another model{where}: its weights or config differ from the given "
                f"model's (fingerprint mismatch); rebuild the index or use that model"
            )
        self._checked.add(model)

    # ------------------------------------------------------------------ first stage
    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, refine: int | None = None
    ) -> None:
        """Override the IVF ``nprobe`` / HNSW ``efSearch`` / IVF-PQ ``refine`` used by later searches."""
        if nprobe is not None:
            if nprobe < 1:
                raise EslmatchError(f"nprobe must be >= 1, got {nprobe}")
            self.faiss_options.nprobe = int(nprobe)
        if refine is not None:
            if refine < 1:
                raise EslmatchError(f"refine must be >= 1, got {refine}")
            self.faiss_options.refine = int(refine)
        if ef_search is not None:
            if ef_search < 1:
                raise EslmatchError(f"ef_search must be >= 1, got {ef_search}")
            self.faiss_options.ef_search = int(ef_search)

    def _ann(self) -> Any:
        if self._faiss is None:
            index = ann.read(self.path / FAISS)
            if int(index.ntotal) != self.count or int(index.d) != self.total_dim:
                raise GalleryIndexError(
                    f"{self.path / FAISS}: holds {index.ntotal} vectors of width {index.d}, "
                    f"the manifest says {self.count} of width {self.total_dim}"
                )
            self._faiss = index
        return self._faiss

    def _query_matrix(self, queries: np.ndarray) -> np.ndarray:
        """Query vectors as float32 ``(Q, Dt)``; one of the wrong width is a clear error."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.total_dim:
            raise GalleryIndexError(
                f"{self.path}: holds vectors of width {self.total_dim}, the query vectors are {tuple(q.shape)} "
                "(a different model)"
            )
        return q

    def first_stage(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` of the gallery for each query vector ``(Q, Dt)`` by inner product.

        Returns ``(scores (Q, n), rows (Q, n))``; rows are -1 where an approximate index
        found fewer than ``n`` candidates. ``ivfpq``: the ``refine * n`` candidates of the
        product codes are re-scored with the exact inner products of the stored global
        vectors, so the scores are exact (ties by row).
        """
        q = self._query_matrix(queries)
        n = min(int(n), self.count)
        depth = ann.candidates(self.faiss_kind, self.faiss_options, n, self.count)
        scores, rows = ann.search(self._ann(), self.faiss_kind, self.faiss_options, q, depth)
        if self.faiss_kind == "ivfpq":  # approximate codes: re-score the candidates exactly
            return ann.refine_exact(q, rows, _RowReader(self.global_vectors), n)  # read, not mapped
        return scores, rows

    def _top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One-stage search: the first stage deep enough that every item tied with the
        ``k``-th best is among the candidates (ties go to the lower row, as everywhere)."""
        depth = min(k + 1, self.count)
        while True:
            fs, rows = self.first_stage(queries, depth)
            if depth >= self.count or not np.any(fs[:, depth - 1] >= fs[:, k - 1]):
                return fs, rows
            depth = min(2 * depth, self.count)

    # ------------------------------------------------------------------ text -> images
    def search_text(
        self, model: Any, text: str, k: int = 10, rerank_k: int | None = 100, timings: dict[str, float] | None = None
    ) -> list[Hit]:
        """Images of this image index for the sentence ``text``, best first.

        ``rerank_k`` is ignored by a one-stage index (its first stage is exact).
        ``timings``: a dict that receives the seconds spent in ``"encode"``,
        ``"first_stage"`` and ``"rerank"`` (added to any values already there).
        """
        return self.search_texts(model, [text], k, rerank_k, timings=timings)[0]

    def search_texts(
        self,
        model: Any,
        texts: Sequence[str],
        k: int = 10,
        rerank_k: int | None = 100,
        batch_size: int = QUERY_BATCH,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search_text` for many sentences (encoded and shortlisted in batches)."""
        self._need("image", "text search")
        self.check_model(model)
        if isinstance(texts, str):
            texts = [texts]
        k, depth, rerank = plan_depth(k, None if self.one_stage else rerank_k, self.count)
        clock = _Clock(timings)
        ids = tokenize_all(model, list(texts), "query")
        results: list[list[Hit]] = []
        with eval_mode(model):
            for b0 in range(0, len(ids), batch_size):
                if self.one_stage:  # the inner product is the score: FAISS's answer is the result
                    vectors = caption_vectors(model, ids[b0 : b0 + batch_size]).float().cpu().numpy()
                    clock.lap("encode")
                    fs, rows = self._top(vectors, k)
                    clock.lap("first_stage")
                    results.extend(self._hits(model, None, fs[j], rows[j], k, False) for j in range(fs.shape[0]))
                    continue
                feats, glob, lens = encode_token_batch(model, ids[b0 : b0 + batch_size])
                glob_np = glob.float().cpu().numpy()
                clock.lap("encode")
                fs, rows = self.first_stage(glob_np, depth)
                clock.lap("first_stage")
                for j in range(feats.shape[0]):
                    w = int(lens[j])
                    query = (feats[j : j + 1, :w], lens[j : j + 1])
                    results.append(self._hits(model, query, fs[j], rows[j], k, rerank))
                clock.lap("rerank")
        return results

    # ------------------------------------------------------------------ image -> captions
    def search_image(
        self,
        model: Any,
        query: Any,
        k: int = 10,
        rerank_k: int | None = 100,
        image_index: GalleryIndex | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Hit]:
        """Captions of this caption index for one image, best first.

        ``query`` is an image id of ``image_index`` (an image index built with the same
        model), an :class:`ImageEntry` from ``image_index.lookup(id)``, or region features
        ``(R, D)`` / ``(1, R, D)`` (array or tensor). For a model that takes pixels it may
        also be an image file (a :class:`pathlib.Path`; a ``str`` is an id), a PIL image, or
        preprocessed pixels ``(3, H, W)``. ``rerank_k`` is ignored by a one-stage index;
        ``timings`` as for :meth:`search_text`.
        """
        return self.search_images(model, [query], k, rerank_k, image_index, timings)[0]

    def search_images(
        self,
        model: Any,
        queries: Sequence[Any],
        k: int = 10,
        rerank_k: int | None = 100,
        image_index: GalleryIndex | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search_image` for many images."""
        self._need("caption", "image search")
        self.check_model(model)
        k, depth, rerank = plan_depth(k, None if self.one_stage else rerank_k, self.count)
        clock = _Clock(timings)
        results: list[list[Hit]] = []
        with eval_mode(model):
            sides, globs = [], []
            for q in queries:
                side, glob = self._image_query(model, q, image_index)
                sides.append(side)
                globs.append(glob)
            clock.lap("encode")
            for b0 in range(0, len(sides), QUERY_BATCH):
                qmat = np.stack(globs[b0 : b0 + QUERY_BATCH])
                fs, rows = self._top(qmat, k) if self.one_stage else self.first_stage(qmat, depth)
                clock.lap("first_stage")
                for j, side in enumerate(sides[b0 : b0 + QUERY_BATCH]):
                    results.append(self._hits(model, side, fs[j], rows[j], k, rerank))
                clock.lap("rerank")
        return results

    def _image_query(
        self, model: Any, query: Any, image_index: GalleryIndex | None
    ) -> tuple[torch.Tensor | None, np.ndarray]:
        """``(image side (1, R, Dt) on the model's device, global (Dt,))`` of a query (the side
        is ``None`` for a one-stage index)."""
        if isinstance(query, (str, int, np.integer)) and not isinstance(query, bool):
            if image_index is None:
                raise EslmatchError("an image id as query needs image_index= (the image index holding it)")
            query = image_index.lookup(int(query) if isinstance(query, np.integer) else query)
        if isinstance(query, ImageEntry):
            if query.fingerprint != self.fingerprint:
                raise GalleryIndexError(
                    f"image {query.id!r} comes from an index built with another model than {self.path}"
                )
            if self.one_stage:
                return None, query.global_vector
            if query.side is None:
                raise GalleryIndexError(f"image {query.id!r} comes from a one-stage index: it has no image side")
            return torch.from_numpy(query.side).to(model.device)[None], query.global_vector
        if takes_pixels(model):
            pixels = self._pixels(model, query)
            if not self.one_stage:
                side, glob, _ = encode_images(model, pixels, None)
                return side, glob[0].float().cpu().numpy()
            return None, image_vectors(model, pixels)[0].float().cpu().numpy()
        if isinstance(query, Path) or type(query).__module__.startswith("PIL"):
            raise EslmatchError(
                f"this model ({model_kind(model)}) takes region features, not image files: give the image's "
                "region features (R, D)"
            )
        regions = torch.as_tensor(np.asarray(query) if not isinstance(query, torch.Tensor) else query)
        if self.one_stage:
            if regions.dim() == 2:
                regions = regions[None]
            if regions.dim() != 3 or regions.shape[0] != 1:
                raise EslmatchError(
                    f"a query image must be region features (R, D) or (1, R, D), got {tuple(regions.shape)}"
                )
            return None, image_vectors(model, regions)[0].float().cpu().numpy()
        if regions.dim() == 2:
            regions = regions[None]
        if regions.dim() != 3 or regions.shape[0] != 1:
            raise EslmatchError(
                f"a query image must be region features (R, D) or (1, R, D), got {tuple(regions.shape)}"
            )
        side, glob, _ = encode_images(model, regions, None)
        return side, glob[0].float().cpu().numpy()

    @staticmethod
    def _pixels(model: Any, query: Any) -> torch.Tensor:
        """``(1, 3, H, W)`` pixels of an image file, a PIL image or preprocessed pixels."""
        if isinstance(query, Path):
            try:
                query = open_image(query)
            except SkipImage as exc:
                raise EslmatchError(f"{query}: {exc}") from None
        elif type(query).__module__.startswith("PIL"):
            query = to_rgb(query)
        if type(query).__module__.startswith("PIL"):
            query = model.preprocess(query)
        pixels = torch.as_tensor(np.asarray(query) if not isinstance(query, torch.Tensor) else query)
        if pixels.dim() == 3:
            pixels = pixels[None]
        if pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
            raise EslmatchError(
                f"a query image must be an image file, a PIL image or pixels (3, H, W), got {tuple(pixels.shape)}"
            )
        return pixels

    # ------------------------------------------------------------------ re-ranking
    def _hits(self, model: Any, query: Any, fs: np.ndarray, rows: np.ndarray, k: int, rerank: bool) -> list[Hit]:
        keep = rows >= 0
        fs, rows = fs[keep], rows[keep].astype(np.int64)
        if rerank and rows.size and not self.one_stage:
            scores = self._esl_scores(model, query, rows)
        else:
            scores = fs.astype(np.float64)
        order = np.lexsort((rows, -scores))[:k]  # best score first, ties by row
        out = []
        for rank, j in enumerate(order, start=1):
            r = int(rows[j])
            out.append(
                Hit(
                    rank,
                    self.ids[r],
                    self._paths[r] or None,
                    float(scores[j]),
                    float(fs[j]),
                    r,
                    None if self.captions is None else self.captions[r],
                )
            )
        return out

    def _gather(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Stored side rows (sorted for locality), trimmed to their longest real length."""
        self._need_two_stage("re-ranking")
        assert self.side is not None and self.lengths is not None
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        lens = np.asarray(self.lengths[srt], dtype=np.int64)
        w = int(lens.max())
        prefetch(self.side, srt)  # one read request per row, all in flight at once
        if self.side_scale is not None:
            prefetch(self.side_scale, srt)
        block = np.ascontiguousarray(self.side[srt, :w])  # fancy indexing: a fresh, writable copy
        # torch widens float16 / int8 several times faster than numpy
        items = torch.from_numpy(block).to(device, torch.float32)
        if self.side_scale is not None:
            scale = np.ascontiguousarray(self.side_scale[srt, :w], dtype=np.float32)
            items *= torch.from_numpy(scale).to(device)[..., None]
            self._touched(len(srt), scale[0].nbytes if len(srt) else 0)
        self._touched(len(srt), block[0].nbytes if len(srt) else 0)
        return items, torch.from_numpy(lens).to(device), order

    def _esl_scores(self, model: Any, query: Any, rows: np.ndarray) -> np.ndarray:
        """ESL scores ``(len(rows),)`` of the query against the stored rows."""
        dev = model.device
        items, item_lens, order = self._gather(rows, dev)
        if self.kind == "image":
            cap, cap_len = query
            s = model.score_prepared(items, item_lens, cap, cap_len, self.scoring)[:, 0]
        else:
            side = query
            img_len = torch.full((1,), side.shape[1], dtype=torch.long, device=dev)
            s = model.score_prepared(side, img_len, items, item_lens, self.scoring)[0]
        out = np.empty(len(rows), dtype=np.float64)
        out[order] = s.detach().double().cpu().numpy()
        return out

    # ------------------------------------------------------------------ explanation
    def attention(
        self, model: Any, text: str, item_id: str | int
    ) -> tuple[list[str], np.ndarray, tuple[int, int] | None]:
        """Word-by-region attention of ``text`` over the stored image ``item_id``.

        Returns ``(words, weights (W, R_i), grid)``: ``weights[w]`` is the text-to-image
        softmax of spec section 4 for word ``w`` over the image's ``R_i`` real regions (each
        row sums to 1); ``grid`` is ``(h, w)`` when the regions form a grid (features from
        ``eslmatch extract``), else ``None``.
        """
        self._need("image", "attention")
        if self.one_stage:
            raise EslmatchError(
                f"{self.path}: word-by-region attention needs a two-stage index of an ESL model; this index is "
                "one-stage: it stores one vector per image"
            )
        self.check_model(model)
        assert self.side is not None and self.lengths is not None
        row = self.row_of(item_id)
        n = int(self.lengths[row])
        ids, lens = model.tokenize([text])
        w = int(lens[0])
        with eval_mode(model):
            feats, _, _ = encode_token_batch(model, [ids[0, :w]])
            z = torch.from_numpy(self._side_row(row)).to(feats.device)
            weights = model.attention(feats[0, :w], z)
        grid = self.grid if self.grid is not None and self.grid[0] * self.grid[1] == n else None
        return caption_words(model, text, ids[0, :w]), weights.double().cpu().numpy(), grid

    def close(self) -> None:
        """Drop the memory maps and the FAISS index."""
        self._faiss = None
        self.side = self.lengths = self.global_vectors = self.side_scale = None
