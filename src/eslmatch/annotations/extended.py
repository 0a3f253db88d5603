"""ECCV Caption and CxC: extended positives of the COCO 5K test split, and their metrics.

COCO counts one image right per caption, and five captions per image, although many other
pairs of the 5K test split match. Two annotation sets add verified positives:

- **ECCV Caption** (Chun et al., ECCV 2022): machine-and-human verified positives for 1,261
  query images (22,550 positive captions) and 1,332 query captions (11,279 positive images),
  scored by mAP@R, R-Precision and R@1;
- **CxC** (Crisscrossed Captions, Parekh et al., EACL 2021): positives for every test image
  and 24,972 captions, scored by R@1/5/10.

The annotation files come from the ``eccv-caption`` package (``eccv_caption/data/*.json``,
keyed by COCO image ids and COCO caption annotation ids; ``coco_test_ids.npy``: the 25,000
caption ids of the 5K test split). ``coco`` is the package's ``original_*.json``: COCO's own
one-image-per-caption truth, giving the COCO 5K R@K from the same ids.

Metrics (the package's definitions, to 1e-9, see ``tests/test_extended.py``), for a query
with ``R`` annotated positives, on its ranked gallery:

- ``R@K``: 1 when any positive is in the first ``K``;
- R-Precision: the share of positives in the first ``R``;
- mAP@R: ``(1/R) sum_{r <= R} P@r * [item r is a positive]``;

each averaged over the queries of the set present in the matrix. ``R`` counts every annotated
positive, also one missing from the matrix (it can never be retrieved: the package counts it
too, e.g. two ECCV image queries list a caption outside the 5K test split); with fewer than
``R`` gallery items, the missing places count as misses.

Ranking: scores compared in float64, each query's gallery in the order of
``np.argsort(row)[::-1]``, exactly as :mod:`eslmatch.evaluate` ranks, ties included: only the
first ``max(R, 10)`` places of each row matter, found by partition (:func:`eslmatch.truth.
top_columns`, which argsorts the rows whose top places hold a tie). The package itself takes
ranked lists and breaks no tie: whoever ranks does (its example uses ``torch.topk``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EslmatchError
from ..truth import check_sims, top_columns
from .files import read_json

PACKAGE = "eccv_caption"
INSTALL_HINT = "pip install 'eslmatch[eval]'"
EXTENDED_SETS = ("eccv", "cxc")
FILE_PREFIX = {"eccv": "eccv", "cxc": "cxc", "coco": "original"}
RECALL_KS = (1, 5, 10)
SIDES = ("i2t", "t2i")
_CHUNK_BYTES = 128 << 20
_BYTES_PER_CELL = 40  # float64 copy, partition and masks per ranked score (truth.top_columns)


# ---------------------------------------------------------------------------------------------- the package
def annotation_dir() -> Path:
    """The ``data`` folder of the installed ``eccv-caption`` package (never imported: only read).

    Raises:
        EslmatchError: the package is missing (one line saying what to install).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EslmatchError(
            f"the ECCV Caption / CxC annotations come from the eccv-caption package, which is not installed: "
            f"{INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "coco_test_ids.npy").is_file():
        raise EslmatchError(f"{folder}: the eccv-caption package lacks its annotation files; reinstall: {INSTALL_HINT}")
    return folder


def package_version() -> str:
    try:
        return importlib.metadata.version("eccv-caption")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def parse_extended(text: str | None) -> tuple[str, ...]:
    """``"eccv,cxc"`` -> ``("eccv", "cxc")`` (order of :data:`EXTENDED_SETS`; empty: none)."""
    if not text:
        return ()
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in EXTENDED_SETS]
    if bad or not names:
        raise EslmatchError(f"--extended {text!r}: choose from {', '.join(EXTENDED_SETS)} (comma-separated)")
    return tuple(n for n in EXTENDED_SETS if n in names)


@dataclass(frozen=True)
class Relation:
    """Positives of one direction: query ``keys[q]`` has positives ``values[ptr[q]:ptr[q+1]]``.

    ``keys`` ascending, each query's positives duplicate-free.
    """

    keys: np.ndarray  # (Q,) int64
    ptr: np.ndarray  # (Q + 1,) int64
    values: np.ndarray  # (P,) int64

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.ptr)

    @classmethod
    def from_mapping(cls, mapping: Mapping[int, Sequence[int]]) -> Relation:
        keys = np.array(sorted(mapping), dtype=np.int64)
        lists = [np.unique(np.asarray(mapping[int(k)], dtype=np.int64)) for k in keys]
        sizes = np.array([len(v) for v in lists], dtype=np.int64)
        values = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        return cls(keys, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), values)


@dataclass(frozen=True)
class Positives:
    """One annotation set (``eccv``, ``cxc`` or ``coco``): image -> captions and caption -> images."""

    name: str
    i2t: Relation
    t2i: Relation


def _read_json(path: Path) -> dict[int, list[int]]:
    data = read_json(path, f"eccv-caption annotation file (reinstall: {INSTALL_HINT})")
    try:
        return {int(k): [int(x) for x in v] for k, v in data.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise EslmatchError(f"{path}: not an annotation file ({exc}); reinstall: {INSTALL_HINT}") from exc


@lru_cache(maxsize=8)
def load_positives(name: str, data_dir: str | None = None) -> Positives:
    """The positives of annotation set ``name`` (``eccv``, ``cxc``, ``coco``) from the package files."""
    if name not in FILE_PREFIX:
        raise EslmatchError(f"unknown annotation set {name!r}: choose one of {', '.join(FILE_PREFIX)}")
    folder = Path(data_dir) if data_dir else annotation_dir()
    prefix = FILE_PREFIX[name]
    i2t = _read_json(folder / f"{prefix}_image_to_caption.json")
    t2i = _read_json(folder / f"{prefix}_caption_to_image.json")
    return Positives(name, Relation.from_mapping(i2t), Relation.from_mapping(t2i))


@dataclass(frozen=True)
class TestSplit:
    """The COCO 5K test split: ``caption_ids`` (25,000, the package's order), the image of each,
    and ``image_ids`` (5,000) in the order they first appear (images of 5 consecutive captions)."""

    image_ids: np.ndarray
    caption_ids: np.ndarray
    image_of_caption: np.ndarray


@lru_cache(maxsize=2)
def coco_test_split(data_dir: str | None = None) -> TestSplit:
    """The 5K test split's ids, from ``coco_test_ids.npy`` and COCO's own truth (``original_*``)."""
    folder = Path(data_dir) if data_dir else annotation_dir()
    try:
        caption_ids = np.load(folder / "coco_test_ids.npy", allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise EslmatchError(f"{folder}/coco_test_ids.npy: unreadable ({exc}); reinstall: {INSTALL_HINT}") from exc
    coco = load_positives("coco", str(folder))
    where = np.searchsorted(coco.t2i.keys, caption_ids)
    image_of = coco.t2i.values[coco.t2i.ptr[np.minimum(where, len(coco.t2i.keys) - 1)]]
    _, first = np.unique(image_of, return_index=True)
    return TestSplit(image_of[np.sort(first)], caption_ids, image_of)


# ---------------------------------------------------------------------------------------------- ids
def _first_duplicate(ids: np.ndarray) -> tuple[int, int, int] | None:
    """``(id, first index, second index)`` of the first repeated id, or ``None``."""
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not same.size:
        return None
    pairs = sorted((int(order[s + 1]), int(order[s])) for s in same)  # (later, earlier): first repeat in file order
    later, earlier = pairs[0]
    return int(ids[later]), earlier, later


def check_ids(
    image_ids: Any,
    caption_ids: Any,
    shape: tuple[int, int],
    captions_per_image: int | None = None,
    image_source: str = "image ids",
    caption_source: str = "caption ids",
    data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check the COCO ids of a score matrix's rows and columns against the 5K test split.

    Args:
        image_ids: ``(N,)`` the COCO image id of each row.
        caption_ids: ``(M,)`` the COCO caption annotation id of each column.
        shape: the matrix's ``(N, M)``.
        captions_per_image: when given, column ``c`` must be a caption of row ``c // k``'s
            image (the standard protocol's layout).
    Returns:
        both as int64 arrays.
    Raises:
        EslmatchError: naming the source and the first bad entry (1-based line): the wrong
        count, a repeated id, an id outside the 5K test split, a caption of another image.
    """
    img = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    cap = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
    n, m = shape
    if len(img) != n:
        raise EslmatchError(f"{image_source}: {len(img)} ids for the {n} image rows of the scores")
    if len(cap) != m:
        raise EslmatchError(f"{caption_source}: {len(cap)} ids for the {m} caption columns of the scores")
    split = coco_test_split(data_dir)
    for ids, known, source, what in (
        (img, split.image_ids, image_source, "image"),
        (cap, split.caption_ids, caption_source, "caption"),
    ):
        article = "an" if what == "image" else "a"
        dup = _first_duplicate(ids)
        if dup is not None:
            raise EslmatchError(f"{source}: {what} id {dup[0]} appears twice (lines {dup[1] + 1} and {dup[2] + 1})")
        unknown = np.flatnonzero(~np.isin(ids, known))
        if unknown.size:
            raise EslmatchError(
                f"{source}: line {unknown[0] + 1}: {ids[unknown[0]]} is not {article} {what} id of the COCO 5K test split "
                f"({unknown.size} unknown id(s); rows are COCO image ids, columns COCO caption annotation ids)"
            )
    if captions_per_image:
        order = np.argsort(split.caption_ids)
        owner = split.image_of_caption[order[np.searchsorted(split.caption_ids[order], cap)]]
        expected = img[np.arange(m) // captions_per_image]
        bad = np.flatnonzero(owner != expected)
        if bad.size:
            c = int(bad[0])
            raise EslmatchError(
                f"{caption_source}: line {c + 1}: caption {cap[c]} describes COCO image {owner[c]}, but column {c} "
                f"belongs to row {c // captions_per_image} (image {expected[c]}): the ids do not follow the "
                f"(N, {captions_per_image}N) layout ({bad.size} such column(s))"
            )
    return img, cap


# ---------------------------------------------------------------------------------------------- ranking
def _row_step(n_cols: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, n_cols * _BYTES_PER_CELL))


def top_ranked(sims: np.ndarray, side: str, queries: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` gallery items of each query, in ``np.argsort(row)[::-1]`` order.

    Args:
        sims: ``(N, M)`` scores, rows images, columns captions.
        side: ``"i2t"`` (queries are rows, the gallery captions) or ``"t2i"`` (columns, images).
        queries: ``(Q,)`` row (i2t) or column (t2i) indices.
        k: places wanted, ``1 <= k <=`` the gallery size.
    Returns:
        ``(Q, k)`` int64 gallery indices, best first.
    """
    gallery = sims.shape[1] if side == "i2t" else sims.shape[0]
    out = np.empty((len(queries), k), dtype=np.int64)
    step = _row_step(gallery)
    for q0 in range(0, len(queries), step):
        idx = queries[q0 : q0 + step]
        if side == "i2t":
            rows = np.asarray(sims[idx], dtype=np.float64)
        else:
            rows = np.ascontiguousarray(np.asarray(sims[:, idx], dtype=np.float64).T)
        out[q0 : q0 + step] = top_columns(rows, k, "released")
    return out


def ranking_metrics(hits: np.ndarray, n_pos: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Mean R@K, R-Precision and mAP@R of ranked hit lists.

    Args:
        hits: ``(Q, L)`` bool, whether the item at place ``j`` is a positive of query ``q``;
            ``L >= max(n_pos)`` or the whole gallery (places beyond it are misses).
        n_pos: ``(Q,)`` the number of annotated positives ``R`` of each query, ``>= 1``.
        ks: the ``K`` of ``R@K``.
    Returns:
        ``{"r1": ..., "r5": ..., "rprecision": ..., "map_at_r": ...}``, fractions in [0, 1].
    """
    q, width = hits.shape
    r = np.asarray(n_pos, dtype=np.int64)[:, None]
    places = np.arange(1, width + 1)[None, :]
    within = places <= r  # (Q, L): the first R places
    cum = np.cumsum(hits, axis=1)
    out = {f"r{k}": float(np.count_nonzero(hits[:, : min(k, width)].any(axis=1))) / q for k in ks}
    out["rprecision"] = float(np.mean((hits & within).sum(axis=1) / r[:, 0]))
    out["map_at_r"] = float(np.mean(np.where(hits & within, cum / places, 0.0).sum(axis=1) / r[:, 0]))
    return out


@dataclass(frozen=True)
class QuerySet:
    """The queries of one annotation set and direction present in a matrix.

    ``queries``: matrix indices (rows for i2t, columns for t2i); ``n_pos``: their annotated
    positive counts; ``keys``: sorted ``local query * gallery + gallery index`` of every
    positive present; ``unreachable``: annotated positives absent from the gallery.
    """

    queries: np.ndarray
    n_pos: np.ndarray
    keys: np.ndarray
    unreachable: int


def _index_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position of each ``wanted`` id in ``ids`` (unique), ``-1`` when absent."""
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], wanted)
    pos = np.minimum(pos, len(ids) - 1)
    found = ids[order][pos] == wanted
    return np.where(found, order[pos], -1)


def query_set(relation: Relation, query_ids: np.ndarray, gallery_ids: np.ndarray) -> QuerySet:
    """The queries of ``relation`` among ``query_ids`` (matrix order), positives mapped to the gallery."""
    where = _index_of(query_ids, relation.keys)  # (K,) matrix index of each annotated query
    present = np.flatnonzero(where >= 0)
    order = present[np.argsort(where[present])]  # queries in matrix order
    sizes = relation.sizes[order]
    flat = [relation.values[relation.ptr[k] : relation.ptr[k + 1]] for k in order]
    gallery = _index_of(gallery_ids, np.concatenate(flat) if flat else np.zeros(0, np.int64))
    local = np.repeat(np.arange(len(order), dtype=np.int64), sizes)
    keep = gallery >= 0
    keys = np.sort(local[keep] * len(gallery_ids) + gallery[keep])
    return QuerySet(where[order], sizes, keys, int(np.count_nonzero(~keep)))


def ranked_hits(top: np.ndarray, keys: np.ndarray, gallery_size: int) -> np.ndarray:
    """``(Q, L)`` bool: whether ``top[q, j]`` is a positive of query ``q`` (``keys`` sorted)."""
    want = np.arange(top.shape[0], dtype=np.int64)[:, None] * gallery_size + top
    if not keys.size:
        return np.zeros(top.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    return keys[pos] == want


# ---------------------------------------------------------------------------------------------- the metrics
def _metric_names(name: str) -> dict[str, str]:
    """Our metric keys -> the package's names for annotation set ``name``."""
    if name == "eccv":
        return {"map_at_r": "eccv_map_at_r", "rprecision": "eccv_rprecision", "r1": "eccv_r1"}
    prefix = "coco_5k" if name == "coco" else name
    return {f"r{k}": f"{prefix}_r{k}" for k in RECALL_KS}


def extended_metrics(
    sims: Any,
    image_ids: Any,
    caption_ids: Any,
    sets: Sequence[str] = EXTENDED_SETS,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """ECCV Caption / CxC metrics and the COCO 5K R@K of a score matrix.

    Args:
        sims: ``(N, M)`` scores, rows images, columns captions.
        image_ids: ``(N,)`` COCO image ids of the rows; caption_ids: ``(M,)`` COCO caption
            annotation ids of the columns (:func:`check_ids` checks them).
        sets: from ``("eccv", "cxc")``; the COCO 5K recalls are always added.
    Returns:
        ``{"extended": {"eccv_map_at_r": {"i2t": x, "t2i": y}, "eccv_rprecision", "eccv_r1",
        "cxc_r1", "cxc_r5", "cxc_r10", "coco_5k_r1", "coco_5k_r5", "coco_5k_r10"}, "info":
        {"sets", "queries": {set: {"i2t", "t2i"}}, "unreachable_positives": {...},
        "annotations", "full_split"}}``: the package's names and scale (fractions).
    """
    arr = check_sims(sims)
    img = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    cap = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
    if (len(img), len(cap)) != arr.shape:
        raise EslmatchError(f"{len(img)} image ids and {len(cap)} caption ids for a {arr.shape} score matrix")
    names = [s for s in EXTENDED_SETS if s in sets]
    if len(names) != len(tuple(sets)):
        raise EslmatchError(f"unknown annotation set in {list(sets)}: choose from {', '.join(EXTENDED_SETS)}")
    chosen = [*names, "coco"]
    per_side: dict[str, dict[str, QuerySet]] = {side: {} for side in SIDES}
    for name in chosen:
        pos = load_positives(name, data_dir)
        per_side["i2t"][name] = query_set(pos.i2t, img, cap)
        per_side["t2i"][name] = query_set(pos.t2i, cap, img)
    extended: dict[str, dict[str, float | None]] = {}
    info: dict[str, Any] = {
        "sets": names,
        "queries": {name: {} for name in chosen},
        "unreachable_positives": {name: {} for name in chosen},
        "annotations": f"eccv-caption {package_version()}",
        "full_split": bool(arr.shape == (5000, 25000)),
    }
    for side in SIDES:
        gallery = arr.shape[1] if side == "i2t" else arr.shape[0]
        sets_here = per_side[side]
        union = np.unique(np.concatenate([qs.queries for qs in sets_here.values()]))
        widest = max([int(qs.n_pos.max()) for qs in sets_here.values() if qs.n_pos.size] + [max(RECALL_KS)])
        k = min(widest, gallery)
        top = top_ranked(arr, side, union, k) if union.size else np.zeros((0, k), np.int64)
        for name, qs in sets_here.items():
            info["queries"][name][side] = int(qs.queries.size)
            info["unreachable_positives"][name][side] = qs.unreachable
            rows = top[np.searchsorted(union, qs.queries)]
            values = ranking_metrics(ranked_hits(rows, qs.keys, gallery), qs.n_pos) if qs.queries.size else {}
            for ours, theirs in _metric_names(name).items():
                extended.setdefault(theirs, {})[side] = values.get(ours)
    return {"extended": extended, "info": info}


# ---------------------------------------------------------------------------------------------- output
_LABELS = {
    "eccv_map_at_r": "ECCV mAP@R",
    "eccv_rprecision": "ECCV R-Precision",
    "eccv_r1": "ECCV R@1",
    "cxc_r1": "CxC R@1",
    "cxc_r5": "CxC R@5",
    "cxc_r10": "CxC R@10",
    "coco_5k_r1": "COCO 5K R@1",
    "coco_5k_r5": "COCO 5K R@5",
    "coco_5k_r10": "COCO 5K R@10",
}


def format_extended(extended: dict[str, dict[str, float | None]], info: dict[str, Any]) -> str:
    """A readable table of :func:`extended_metrics` (percentages of the fractions)."""

    def cell(v: float | None) -> str:
        return f"{100 * v:>8.2f}" if v is not None else f"{'-':>8}"

    lines = [
        f"extended COCO 5K annotations ({info.get('annotations')}; percent; --json gives the package's fractions)",
        f"{'':<18}{'i2t':>8}{'t2i':>8}",
    ]
    for key, label in _LABELS.items():
        if key in extended:
            lines.append(f"{label:<18}" + "".join(cell(extended[key].get(side)) for side in SIDES))
    queries = info.get("queries", {})
    lines.append(
        "queries (images / captions): "
        + "; ".join(f"{name} {q.get('i2t', 0)} / {q.get('t2i', 0)}" for name, q in queries.items())
    )
    if not info.get("full_split"):
        lines.append("note: the matrix is not the whole 5,000 x 25,000 test split; figures are not comparable")
    return "\n".join(lines)
