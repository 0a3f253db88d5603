"""Truth-based ("semantic") retrieval metrics: every true image-caption pair is a hit.

Standard recall (:mod:`eslmatch.evaluate`) counts only a caption's own image as a hit. Some
datasets know, for every caption, the set of images it is true of (the demo dataset renders
scenes from a grammar and decides truth); these metrics count every true pair.

File format: ``{split}_truth.json`` holds a JSON object ``{"captions": [[image indices],
...]}``, one list per caption of the split, in caption order, of indices into the split's
images. Other keys (e.g. ``"images_per_caption"``) are allowed and ignored. An index listed
twice counts once. An empty list (a caption true of no image) is allowed.

Metrics of a score matrix ``sims`` ``(N images, M captions)``, both directions:

- text-to-image: each caption ranks the N images by score; semantic ``P@K`` is the share of
  its top ``K`` images that the caption is true of, semantic ``R@K`` is 1 when any of them is.
- image-to-text: each image ranks the M captions; the pair (image ``i``, caption ``c``) is
  true when ``i`` is in ``truth[c]``; ``P@K`` and ``R@K`` likewise.

Averages are percentages (0-100) over the queries that have at least one true answer: a
caption true of no image is left out of text-to-image, an image no caption is true of is
left out of image-to-text (every query's P@K and R@K would be 0 whatever the model); both are
counted in the result (``"no_truth"``). A gallery smaller than ``K`` gives ``P@K`` over the
whole gallery (the hits divided by its size, not by ``K``).

Ties: scores are compared in float64 and each row is ranked as :mod:`eslmatch.evaluate`
ranks, i.e. by position in ``np.argsort(row)[::-1]`` with numpy's default sort
(``ties="released"``, the default). A score tied with no other score of its row sits after
exactly the higher scores; tied scores fall where numpy's default argsort puts them, as in
the standard metrics, so a caption whose own image is true is a semantic hit whenever it
is a standard hit. ``ties="stable"`` ranks by ``np.argsort(-row, kind="stable")`` instead
(among equal scores the lower index first), which does not depend on numpy's sort
implementation. Only rows whose top ``max(ks)`` involve a tie are sorted; the others are
partitioned. Rows are ranked in chunks of about 128 MB of temporaries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

from .errors import EslmatchError
from .evaluate import check_protocol_size, check_score_matrix, get_protocol

TRUTH_KS = (1, 5, 10)
TIES = ("released", "stable")
_CHUNK_BYTES = 128 << 20
_BYTES_PER_CELL = 40  # float64 copy, partition, masks, cumulative counts: temporaries per ranked score

# One side's metrics: ``p{k}`` / ``r{k}`` percentages (``None``: no query), ``queries``,
# ``no_truth`` (counts) and ``mean_true``.
SideMetrics = dict[str, float | int | None]
SIDES: tuple[Literal["i2t"], Literal["t2i"]] = ("i2t", "t2i")


class TruthMetrics(TypedDict, total=False):
    """A :func:`truth_metrics` / :func:`evaluate_truth` result (``caption_subset`` /
    ``image_subset`` with a mask; ``protocol`` on, ``fold_size``, ``folds`` and
    ``fold_true_pairs`` with folds)."""

    i2t: SideMetrics
    t2i: SideMetrics
    ks: list[int]
    ties: str
    n_images: int
    n_captions: int
    true_pairs: int
    caption_subset: int
    image_subset: int
    fold_true_pairs: int
    fold_size: int
    folds: list[TruthMetrics]
    protocol: str
    own_image_missing: int


class TruthPairs:
    """The true (image, caption) pairs of a split, for masking a batch's false negatives.

    Args:
        truth: ``M`` arrays, ``truth[c]`` the images caption ``c`` is true of
            (:func:`load_truth`).
        n_images: images in the split.
    """

    def __init__(self, truth: Sequence[np.ndarray], n_images: int) -> None:
        self.n_images = int(n_images)
        self.n_captions = len(truth)
        sizes = truth_sizes(truth)
        caps = np.repeat(np.arange(len(truth), dtype=np.int64), sizes)
        imgs = np.concatenate([np.asarray(t, dtype=np.int64) for t in truth]) if len(truth) else np.zeros(0, np.int64)
        self._keys = np.unique(caps * self.n_images + imgs)

    def mask(self, image_index: npt.ArrayLike, caption_index: npt.ArrayLike) -> np.ndarray:
        """``(n, m)`` bool: caption ``caption_index[j]`` is true of image ``image_index[i]``."""
        img = np.asarray(image_index, dtype=np.int64).reshape(-1)
        cap = np.asarray(caption_index, dtype=np.int64).reshape(-1)
        if img.size and (img.min() < 0 or img.max() >= self.n_images):
            raise EslmatchError(f"image index out of range for a truth of {self.n_images} images")
        if cap.size and (cap.min() < 0 or cap.max() >= self.n_captions):
            raise EslmatchError(f"caption index out of range for a truth of {self.n_captions} captions")
        keys = cap[None, :] * self.n_images + img[:, None]
        if not self._keys.size:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        return self._keys[pos] == keys


def truth_path(root: str | Path, split: str) -> Path:
    """``root/{split}_truth.json``, where a dataset keeps the truth of a split."""
    return Path(root) / f"{split}_truth.json"


# ---------------------------------------------------------------------------------------------- loading
def load_truth(path: str | Path, n_images: int | None, n_captions: int | None) -> list[np.ndarray]:
    """Read and check a truth file; one sorted, duplicate-free int64 array per caption.

    Args:
        path: a ``{split}_truth.json`` file (see the module docstring).
        n_images: the split's image count (indices must lie in ``[0, n_images)``); ``None``
            skips the range check.
        n_captions: the split's caption count (the file must hold that many lists); ``None``
            skips the count check.
    Raises:
        EslmatchError: naming the file and the first bad entry (not JSON, no ``"captions"``
        list, an entry that is not a list of integers, an index out of range, the wrong
        number of captions).
    """
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise EslmatchError(f"{p}: no such truth file") from None
    except IsADirectoryError:
        raise EslmatchError(f"{p}: is a directory, not a truth file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EslmatchError(f"{p}: cannot read the truth file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise EslmatchError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("captions"), list):
        raise EslmatchError(f'{p}: expected a JSON object {{"captions": [[image indices, ...], ...]}}')
    entries = data["captions"]
    out: list[np.ndarray] = []
    for c, entry in enumerate(entries):
        if not isinstance(entry, list):
            raise EslmatchError(f"{p}: caption {c}: expected a list of image indices, got {type(entry).__name__}")
        bad = next((x for x in entry if type(x) is not int), None)  # bool is not an index, nor 2.0
        if bad is not None:
            raise EslmatchError(f"{p}: caption {c}: image index {bad!r} is not an integer")
        if n_images is not None:
            out_of_range = next((x for x in entry if not 0 <= x < n_images), None)
            if out_of_range is not None:
                raise EslmatchError(
                    f"{p}: caption {c}: image index {out_of_range} out of range (the split has {n_images} images)"
                )
        try:
            out.append(np.unique(np.asarray(entry, dtype=np.int64)))
        except OverflowError:
            raise EslmatchError(f"{p}: caption {c}: image index out of range") from None
    if n_captions is not None and len(out) != n_captions:
        raise EslmatchError(f"{p}: holds {len(out)} caption lists; the split has {n_captions} captions")
    return out


def check_truth(
    truth: Sequence[npt.ArrayLike], n_images: int, n_captions: int, source: str = "truth"
) -> list[np.ndarray]:
    """``truth`` (one sequence of image indices per caption) as sorted unique int64 arrays.

    Raises :class:`EslmatchError` for the wrong caption count, a non-integer or an index
    outside ``[0, n_images)``, naming ``source`` and the first bad caption.
    """
    if len(truth) != n_captions:
        raise EslmatchError(f"{source}: holds {len(truth)} caption lists; the scores have {n_captions} captions")
    out = []
    for c, entry in enumerate(truth):
        arr = np.asarray(entry)
        if arr.size == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise EslmatchError(f"{source}: caption {c}: expected a flat list of integer image indices")
        if arr.min() < 0 or arr.max() >= n_images:
            bad = arr[(arr < 0) | (arr >= n_images)][0]
            raise EslmatchError(f"{source}: caption {c}: image index {bad} out of range ({n_images} images)")
        out.append(np.unique(arr.astype(np.int64)))
    return out


def truth_sizes(truth: Sequence[np.ndarray]) -> np.ndarray:
    """How many images each caption is true of: ``(M,)`` int64 (e.g. ``sizes <= 3`` as a caption mask)."""
    return np.fromiter((len(t) for t in truth), dtype=np.int64, count=len(truth))


# ---------------------------------------------------------------------------------------------- ranking
def top_columns(rows: np.ndarray, k: int, ties: str = "released") -> np.ndarray:
    """The ``k`` best-scored columns of each row, best first: ``(B, k)`` int64.

    Args:
        rows: ``(B, L)`` float64 scores, ``1 <= k <= L``.
        ties: ``"released"``: the first ``k`` of ``np.argsort(row)[::-1]`` (numpy's default
            sort, as :mod:`eslmatch.evaluate` ranks); ``"stable"``: the first ``k`` of
            ``np.argsort(-row, kind="stable")`` (equal scores: lower index first).
    """
    b, n = rows.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the row length {n}, got {k}")
    if ties not in TIES:
        raise EslmatchError(f"unknown tie rule {ties!r}: choose one of {', '.join(TIES)}")
    if b == 0:
        return np.zeros((0, k), dtype=np.int64)
    thr = np.partition(rows, n - k, axis=1)[:, n - k : n - k + 1]  # (B, 1): the k-th highest score
    if ties == "stable":
        eq = rows == thr
        above = rows > thr
        need = k - above.sum(axis=1, keepdims=True)  # threshold-valued columns to take, lowest index first
        keep = above | (eq & (np.cumsum(eq, axis=1) <= need))
        cols = np.nonzero(keep)[1].reshape(b, k)  # exactly k per row, ascending within the row
        vals = np.take_along_axis(rows, cols, axis=1)
        order = np.lexsort((cols, -vals), axis=-1)  # score descending, then index ascending
        return np.take_along_axis(cols, order, axis=1)
    at_least = rows >= thr
    out = np.empty((b, k), dtype=np.int64)
    exact = np.flatnonzero(at_least.sum(axis=1) == k)  # no tie across the top-k boundary
    if exact.size:
        cols = np.nonzero(at_least[exact])[1].reshape(exact.size, k)
        vals = np.take_along_axis(rows[exact], cols, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        out[exact] = np.take_along_axis(cols, order, axis=1)
        svals = np.take_along_axis(vals, order, axis=1)
        tied_inside = (svals[:, 1:] == svals[:, :-1]).any(axis=1)  # a tie within the top k
    else:
        tied_inside = np.zeros(0, dtype=bool)
    clean = np.zeros(b, dtype=bool)
    clean[exact[~tied_inside]] = True
    tied = np.flatnonzero(~clean)
    if tied.size:  # rank exactly as eslmatch.evaluate: positions in argsort(row)[::-1]
        out[tied] = np.argsort(rows[tied], axis=1)[:, ::-1][:, :k]
    return out


def _row_step(n_cols: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, n_cols * _BYTES_PER_CELL))


class _Pairs:
    """The true (caption, image) pairs, grouped by caption and by image, for per-chunk masks."""

    def __init__(self, truth: list[np.ndarray], n_images: int) -> None:
        sizes = truth_sizes(truth)
        self.n_images = n_images
        self.n_captions = len(truth)
        self.cap_ptr = np.concatenate([[0], np.cumsum(sizes)])
        self.cap_images = np.concatenate(truth) if truth else np.zeros(0, dtype=np.int64)
        caps = np.repeat(np.arange(len(truth), dtype=np.int64), sizes)
        order = np.argsort(self.cap_images, kind="stable")
        self.img_captions = caps[order]
        self.img_ptr = np.searchsorted(self.cap_images[order], np.arange(n_images + 1))
        self.captions_per_image = np.diff(self.img_ptr)

    def caption_rows(self, captions: np.ndarray) -> np.ndarray:
        """``(len(captions), N)`` bool: which images each caption is true of."""
        mask = np.zeros((len(captions), self.n_images), dtype=bool)
        for r, c in enumerate(captions):
            mask[r, self.cap_images[self.cap_ptr[c] : self.cap_ptr[c + 1]]] = True
        return mask

    def image_rows(self, images: np.ndarray) -> np.ndarray:
        """``(len(images), M)`` bool: which captions are true of each image."""
        mask = np.zeros((len(images), self.n_captions), dtype=bool)
        for r, i in enumerate(images):
            mask[r, self.img_captions[self.img_ptr[i] : self.img_ptr[i + 1]]] = True
        return mask


def _side(
    sims: np.ndarray,
    queries: np.ndarray,
    by_caption: bool,
    pairs: _Pairs,
    ks: tuple[int, ...],
    ties: str,
) -> dict[int, np.ndarray]:
    """Per-query hit counts in the top ``K`` for every ``K``: ``{K: (Q,) int64}``."""
    gallery = sims.shape[0] if by_caption else sims.shape[1]
    kmax = min(max(ks), gallery)
    hits = {k: np.zeros(len(queries), dtype=np.int64) for k in ks}
    step = _row_step(gallery)
    for q0 in range(0, len(queries), step):
        idx = queries[q0 : q0 + step]
        if by_caption:
            rows = np.ascontiguousarray(np.asarray(sims[:, idx], dtype=np.float64).T)
            member = pairs.caption_rows(idx)
        else:
            rows = np.asarray(sims[idx], dtype=np.float64)
            member = pairs.image_rows(idx)
        top = top_columns(rows, kmax, ties)
        got = np.take_along_axis(member, top, axis=1)
        counts = np.cumsum(got, axis=1)  # hits among the first j + 1
        for k in ks:
            hits[k][q0 : q0 + step] = counts[:, min(k, kmax) - 1]
    return hits


def _summary(
    hits: dict[int, np.ndarray], ks: tuple[int, ...], gallery: int, sizes: np.ndarray, excluded: int
) -> SideMetrics:
    n = len(sizes)
    out: SideMetrics = {}
    for k in ks:
        out[f"p{k}"] = 100.0 * float(hits[k].sum()) / (n * min(k, gallery)) if n else None
    for k in ks:
        out[f"r{k}"] = 100.0 * float(np.count_nonzero(hits[k])) / n if n else None
    out["queries"] = int(n)
    out["no_truth"] = int(excluded)
    out["mean_true"] = float(sizes.mean()) if n else None
    return out


def check_sims(sims: npt.ArrayLike) -> np.ndarray:
    """``sims`` as an array after checking it is a non-empty 2-D matrix of finite numbers (any ``(N, M)``)."""
    arr = np.asarray(sims)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise EslmatchError(f"scores: expected a non-empty 2-D (images x captions) matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise EslmatchError(f"scores: expected numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise EslmatchError(f"scores: non-finite score at image {bad[0]}, caption {bad[1]}")
    return arr


def _check_mask(mask: npt.ArrayLike, n: int, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != (n,) or arr.dtype != bool:
        raise EslmatchError(f"{name}: expected a boolean array of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------- metrics
def truth_metrics(
    sims: npt.ArrayLike,
    truth: Sequence[npt.ArrayLike],
    ks: Sequence[int] = TRUTH_KS,
    caption_mask: npt.ArrayLike | None = None,
    image_mask: npt.ArrayLike | None = None,
    ties: str = "released",
) -> TruthMetrics:
    """Semantic P@K and R@K of ``sims`` ``(N images, M captions)`` against ``truth``.

    Args:
        sims: scores, rows images, columns captions (any ``M``; not only ``k N``).
        truth: ``M`` sequences of image indices, ``truth[c]`` the images caption ``c`` is true
            of (:func:`load_truth`).
        ks: the cut-offs ``K`` (positive integers).
        caption_mask: ``(M,)`` bool, the captions asked as text-to-image queries (e.g.
            ``truth_sizes(truth) <= 3``); default all. The galleries, and image-to-text,
            are unchanged.
        image_mask: ``(N,)`` bool, the images asked as image-to-text queries; default all.
        ties: ``"released"`` (as :mod:`eslmatch.evaluate` ranks) or ``"stable"`` (lower
            index first among equal scores); see the module docstring.
    Returns:
        ``{"t2i": {p1, p5, p10, r1, r5, r10, queries, no_truth, mean_true}, "i2t": {...},
        "ks", "ties", "n_images", "n_captions", "true_pairs"}``, percentages 0-100 (``None``
        when a side has no query), plus ``"caption_subset"`` / ``"image_subset"`` (the mask
        sizes) when a mask is given. ``queries``: the queries averaged over (masked in, with
        at least one true answer); ``no_truth``: those left out for having none;
        ``mean_true``: their mean number of true answers.
    """
    arr = check_sims(sims)
    n, m = arr.shape
    ks_t = tuple(int(k) for k in ks)
    if not ks_t or any(k < 1 for k in ks_t):
        raise EslmatchError(f"ks must be positive integers, got {list(ks)}")
    if ties not in TIES:
        raise EslmatchError(f"unknown tie rule {ties!r}: choose one of {', '.join(TIES)}")
    truth_a = check_truth(truth, n, m)
    pairs = _Pairs(truth_a, n)
    cap_sizes = truth_sizes(truth_a)
    img_sizes = pairs.captions_per_image
    cap_sel = np.ones(m, dtype=bool) if caption_mask is None else _check_mask(caption_mask, m, "caption_mask")
    img_sel = np.ones(n, dtype=bool) if image_mask is None else _check_mask(image_mask, n, "image_mask")
    captions = np.flatnonzero(cap_sel & (cap_sizes > 0))
    images = np.flatnonzero(img_sel & (img_sizes > 0))
    t2i = _side(arr, captions, True, pairs, ks_t, ties)
    i2t = _side(arr, images, False, pairs, ks_t, ties)
    result: TruthMetrics = {
        "i2t": _summary(i2t, ks_t, m, img_sizes[images], int(np.count_nonzero(img_sel & (img_sizes == 0)))),
        "t2i": _summary(t2i, ks_t, n, cap_sizes[captions], int(np.count_nonzero(cap_sel & (cap_sizes == 0)))),
        "ks": list(ks_t),
        "ties": ties,
        "n_images": int(n),
        "n_captions": int(m),
        "true_pairs": int(cap_sizes.sum()),
    }
    if caption_mask is not None:
        result["caption_subset"] = int(cap_sel.sum())
    if image_mask is not None:
        result["image_subset"] = int(img_sel.sum())
    return result


def own_image_missing(truth: Sequence[np.ndarray], captions_per_image: int) -> int:
    """How many captions ``c`` are not true of their own image ``c // captions_per_image``
    (0 for a truth file that matches its split; more hints at a misaligned file)."""
    if not len(truth):
        return 0
    sizes = truth_sizes(truth)
    n = max(int(max((t.max() for t in truth if t.size), default=0)), (len(truth) - 1) // captions_per_image) + 1
    keys = np.repeat(np.arange(len(truth), dtype=np.int64), sizes) * n + np.concatenate(truth)  # ascending
    own = np.arange(len(truth), dtype=np.int64)
    wanted = own * n + own // captions_per_image
    pos = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    found = keys[pos] == wanted if len(keys) else np.zeros(len(truth), dtype=bool)
    return int(np.count_nonzero(~found))


def evaluate_truth(
    sims: npt.ArrayLike,
    truth: Sequence[npt.ArrayLike],
    protocol: str,
    fold_size: int = 1000,
    captions_per_image: int = 5,
    ks: Sequence[int] = TRUTH_KS,
    ties: str = "released",
) -> TruthMetrics:
    """:func:`truth_metrics` of ``sims`` ``(N, k N)`` under an evaluation protocol.

    ``f30k`` and ``coco5k`` rank the whole matrix. ``coco1k`` ranks each fold alone, as the
    standard metrics do: fold ``f`` is images ``f*fold_size:(f+1)*fold_size`` and their
    captions, and a caption's truth is restricted to the fold's images, its indices shifted
    by the fold's first image. Each metric is then the mean over the folds (over the folds
    that have queries), counts are summed, and the per-fold results are under ``"folds"``.
    ``"own_image_missing"`` counts captions not true of their own image (see
    :func:`own_image_missing`).
    """
    proto = get_protocol(protocol)
    arr = check_score_matrix(sims, captions_per_image)
    n, m = arr.shape
    k = captions_per_image
    truth_a = check_truth(truth, n, m)
    if not proto.folds:
        result = truth_metrics(arr, truth_a, ks, ties=ties)
    else:
        check_protocol_size(proto.name, n, fold_size)
        folds = []
        for f in range(proto.folds):
            i0, i1 = f * fold_size, (f + 1) * fold_size
            sub = [t[(t >= i0) & (t < i1)] - i0 for t in truth_a[i0 * k : i1 * k]]
            folds.append(truth_metrics(arr[i0:i1, i0 * k : i1 * k], sub, ks, ties=ties))
        result = _mean_folds(folds)
        result.update(
            {
                "n_images": int(n),
                "n_captions": int(m),
                "true_pairs": int(truth_sizes(truth_a).sum()),
                "fold_size": int(fold_size),
                "folds": folds,
            }
        )
    result["protocol"] = proto.name
    result["own_image_missing"] = own_image_missing(truth_a, k)
    return result


def _mean_folds(folds: list[TruthMetrics]) -> TruthMetrics:
    out: TruthMetrics = {"ks": folds[0]["ks"], "ties": folds[0]["ties"]}
    for side in SIDES:
        merged: SideMetrics = {}
        for key in folds[0][side]:
            values = [v for fold in folds if (v := fold[side][key]) is not None]
            if key in ("queries", "no_truth"):
                merged[key] = int(sum(values))
            else:
                merged[key] = float(np.mean(values)) if values else None
        out[side] = merged
    out["fold_true_pairs"] = int(sum(fold["true_pairs"] for fold in folds))
    return out


# ---------------------------------------------------------------------------------------------- output
def format_truth_metrics(result: TruthMetrics) -> str:
    """A readable table of a :func:`truth_metrics` / :func:`evaluate_truth` result."""
    ks = result["ks"]

    def cell(v: float | None) -> str:
        return f"{v:>7.1f}" if v is not None else f"{'-':>7}"

    head = f"{'':<10}" + "".join(f"{f'P@{k}':>7}" for k in ks) + "".join(f"{f'R@{k}':>7}" for k in ks)
    lines = [
        f"truth-based (semantic) retrieval: every true pair is a hit "
        f"({result['true_pairs']} true pairs; ties: {result['ties']})",
    ]
    if result.get("folds"):
        lines.append(f"mean over {len(result['folds'])} folds (truth restricted to each fold's images):")
    lines.append(head + f"{'queries':>9}")
    for side in SIDES:
        m = result[side]
        lines.append(
            f"{side:<10}"
            + "".join(cell(m[f"p{k}"]) for k in ks)
            + "".join(cell(m[f"r{k}"]) for k in ks)
            + f"{m['queries']:>9}"
        )
    notes = []
    if result["t2i"]["no_truth"]:
        notes.append(f"{result['t2i']['no_truth']} captions true of no image (left out of t2i)")
    if result["i2t"]["no_truth"]:
        notes.append(f"{result['i2t']['no_truth']} images no caption is true of (left out of i2t)")
    if result.get("own_image_missing"):
        notes.append(f"{result['own_image_missing']} captions not true of their own image (a misaligned truth file?)")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
