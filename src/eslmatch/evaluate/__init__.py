"""Retrieval metrics and the evaluation protocols of the ESL paper (spec section 6).

Ranks are those of the released evaluation code: on an ``(N, k N)`` score matrix (rows
images, columns captions, caption ``c`` of image ``c // k``),

- image-to-text: the rank of image ``i`` is the best (smallest) position of any of its
  captions in ``argsort(sims[i])[::-1]``;
- text-to-image: the rank of caption ``c`` is the position of image ``c // k`` in
  ``argsort(sims[:, c])[::-1]``;
- ``R@K = 100 * mean(rank < K)``, ``medr = floor(median(rank)) + 1``,
  ``meanr = mean(rank) + 1``, ``rsum`` = the six recalls summed.

Scores are compared in float64 (the released code keeps its scores in a float64 array).
Where a caption's (or image's) score is tied with another, the row is ranked with numpy's
default ``argsort``, as the released code does, so ties fall exactly as they do there; an
untied target's position is simply the number of higher scores (the same number, without
sorting).

:mod:`eslmatch.evaluate.run` is ``eslmatch eval`` as one call (models or saved matrices, truth,
ECCV Caption / CxC, SugarCrepe / Winoground); it is not imported here, since it builds on
:mod:`eslmatch.truth` and :mod:`eslmatch.annotations`, which build on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from ..data import encode_images, eval_mode, iter_caption_features
from ..data.raw import encode_image_files
from ..errors import EslmatchError
from ..scoring import ScoringOptions
from ..text import pad_ids, tokenize_each
from ..utils import resolve_device
from ..utils.choices import check_precision
from ..utils.precision import inference_precision, to_float32

if TYPE_CHECKING:
    from ..data.precomp import PrecompSplit
    from ..data.raw import ImageCaptionSplit
    from ..model.base import MatchingModel

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")
_RANK_CHUNK_BYTES = 128 << 20
_T = TypeVar("_T")


class SideMetrics(TypedDict):
    """One direction's metrics: R@1/5/10 (percent), medr and meanr (1-based)."""

    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float


class RecallMetrics(TypedDict):
    """What :func:`recall_metrics` returns: both directions and the sum of the six recalls."""

    i2t: SideMetrics
    t2i: SideMetrics
    rsum: float


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: which split, and whole-matrix or 5-fold ranking."""

    name: str
    default_split: str
    folds: int  # 0: the whole matrix; else this many consecutive folds of ``fold_size`` images
    standard_images: int  # the image count of the published protocol
    description: str


PROTOCOLS: dict[str, Protocol] = {
    "f30k": Protocol("f30k", "test", 0, 1000, "Flickr30K 1K test images"),
    "coco1k": Protocol("coco1k", "testall", 5, 5000, "MS-COCO 1K: mean over 5 folds of 1,000 testall images"),
    "coco5k": Protocol("coco5k", "testall", 0, 5000, "MS-COCO 5K: all 5,000 testall images"),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise EslmatchError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}") from None


def check_protocol_size(protocol: str, n_images: int, fold_size: int = 1000) -> None:
    """Refuse an image count the protocol cannot split (``coco1k``: exactly 5 folds)."""
    proto = get_protocol(protocol)
    if proto.folds and (fold_size < 1 or n_images != proto.folds * fold_size):
        hint = f" (use --fold-size {n_images // proto.folds} for smaller data)" if n_images % proto.folds == 0 else ""
        raise EslmatchError(
            f"protocol {proto.name} needs {proto.folds} folds of {fold_size} images "
            f"({proto.folds * fold_size} images); the data has {n_images}{hint}"
        )


# ---------------------------------------------------------------------- ranks
def check_score_matrix(sims: npt.ArrayLike, captions_per_image: int = 5, source: str = "score matrix") -> np.ndarray:
    """Return ``sims`` as a 2-D float array after checking shape ``(N, k N)`` and finiteness."""
    arr = np.asarray(sims)
    if captions_per_image < 1:
        raise EslmatchError(f"captions per image must be >= 1, got {captions_per_image}")
    if arr.ndim != 2:
        raise EslmatchError(f"{source}: expected a 2-D (images x captions) matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise EslmatchError(f"{source}: scores must be numbers, got dtype {arr.dtype}")
    n, m = arr.shape
    if n == 0 or m != captions_per_image * n:
        raise EslmatchError(
            f"{source}: shape {arr.shape} is not (N, {captions_per_image}N) "
            f"(rows images, columns {captions_per_image} captions per image in order)"
        )
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise EslmatchError(f"{source}: non-finite score at image {bad[0]}, caption {bad[1]}")
    return arr


def _row_step(n_cols: int, n_targets: int) -> int:
    """Rows ranked at once, so that the temporaries stay within ~128 MB."""
    return max(1, _RANK_CHUNK_BYTES // max(1, n_cols * max(8 * 3, 2 * n_targets)))


def target_positions(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Position of column ``targets[b, t]`` in ``argsort(rows[b])[::-1]``.

    Args:
        rows: ``(B, M)`` float64 scores.
        targets: ``(B, T)`` column indices.
    Returns:
        ``(B, T)`` int64 0-based positions.

    A target whose score no other column of its row equals sits after exactly the columns
    scoring higher, whatever the sort algorithm: its position is that count. Rows where a
    target ties with another column are argsorted, so ties fall as numpy's argsort puts them.
    """
    b_idx = np.arange(rows.shape[0])[:, None]
    vals = rows[b_idx, targets]  # (B, T)
    higher = (rows[:, None, :] > vals[:, :, None]).sum(axis=2)
    equal = (rows[:, None, :] == vals[:, :, None]).sum(axis=2)
    pos = higher.astype(np.int64)
    tied = np.flatnonzero((equal > 1).any(axis=1))
    if tied.size:
        order = np.argsort(rows[tied], axis=1)[:, ::-1]
        inverse = np.empty_like(order)
        inverse[np.arange(len(tied))[:, None], order] = np.arange(rows.shape[1])[None, :]
        pos[tied] = np.take_along_axis(inverse, targets[tied], axis=1)
    return pos


def i2t_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """0-based image-to-text rank of every image of ``sims`` ``(N, k N)``: ``(N,)`` int64."""
    n, m = sims.shape
    k = captions_per_image
    ranks = np.empty(n, dtype=np.int64)
    step = _row_step(m, k)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        own = np.arange(r0, r1)[:, None] * k + np.arange(k)[None, :]  # (B, k) the image's captions
        ranks[r0:r1] = target_positions(np.asarray(sims[r0:r1], dtype=np.float64), own).min(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """0-based text-to-image rank of every caption of ``sims`` ``(N, k N)``: ``(k N,)`` int64."""
    n, m = sims.shape
    k = captions_per_image
    ranks = np.empty(m, dtype=np.int64)
    step = _row_step(n, 1)
    for c0 in range(0, m, step):
        c1 = min(c0 + step, m)
        cols = np.ascontiguousarray(np.asarray(sims[:, c0:c1], dtype=np.float64).T)
        ranks[c0:c1] = target_positions(cols, (np.arange(c0, c1) // k)[:, None])[:, 0]
    return ranks


def summarize_ranks(ranks: np.ndarray) -> SideMetrics:
    """R@1/5/10 (percent), medr and meanr (1-based) of 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)

    def recall(k: int) -> float:
        return 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks)

    return {
        "r1": recall(1),
        "r5": recall(5),
        "r10": recall(10),
        "medr": float(np.floor(np.median(ranks)) + 1),
        "meanr": float(ranks.mean() + 1),
    }


def _recall_sum(side: SideMetrics) -> float:
    return side["r1"] + side["r5"] + side["r10"]


def recall_metrics(sims: npt.ArrayLike, captions_per_image: int = 5) -> RecallMetrics:
    """Image-to-text and text-to-image metrics of an ``(N, k N)`` score matrix.

    Returns:
        ``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum": float}``.
    """
    arr = check_score_matrix(sims, captions_per_image)
    i2t = summarize_ranks(i2t_ranks(arr, captions_per_image))
    t2i = summarize_ranks(t2i_ranks(arr, captions_per_image))
    rsum = _recall_sum(i2t) + _recall_sum(t2i)
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum}


def _mean(values: Iterable[float]) -> float:
    return float(np.mean(list(values)))


def _mean_side(sides: Sequence[SideMetrics]) -> SideMetrics:
    return {
        "r1": _mean(s["r1"] for s in sides),
        "r5": _mean(s["r5"] for s in sides),
        "r10": _mean(s["r10"] for s in sides),
        "medr": _mean(s["medr"] for s in sides),
        "meanr": _mean(s["meanr"] for s in sides),
    }


def mean_metrics(results: Sequence[RecallMetrics]) -> RecallMetrics:
    """Metric-by-metric mean of several :func:`recall_metrics` results (rsum included)."""
    return {
        "i2t": _mean_side([r["i2t"] for r in results]),
        "t2i": _mean_side([r["t2i"] for r in results]),
        "rsum": _mean(r["rsum"] for r in results),
    }


def evaluate_protocol(
    sims: npt.ArrayLike, protocol: str, fold_size: int = 1000, captions_per_image: int = 5
) -> dict[str, Any]:
    """Metrics of ``sims`` ``(N, k N)`` under ``protocol`` (``f30k``, ``coco1k``, ``coco5k``).

    ``coco1k`` needs exactly ``5 * fold_size`` images: fold ``f`` is images
    ``f*fold_size:(f+1)*fold_size`` against their captions; the result is the mean of each
    metric over the folds (``rsum`` the mean of the fold rsums), per-fold results under
    ``"folds"``. The other protocols rank the whole matrix.
    """
    proto = get_protocol(protocol)
    arr = check_score_matrix(sims, captions_per_image)
    n, m = arr.shape
    k = captions_per_image
    check_protocol_size(proto.name, n, fold_size)
    if proto.folds:
        folds = []
        for f in range(proto.folds):
            i0, i1 = f * fold_size, (f + 1) * fold_size
            folds.append(recall_metrics(arr[i0:i1, i0 * k : i1 * k], k))
        result: dict[str, Any] = {**mean_metrics(folds), "folds": folds}
    else:
        result = {**recall_metrics(arr, k)}
    result.update(
        protocol=proto.name,
        n_images=int(n),
        n_captions=int(m),
        captions_per_image=k,
        standard_size=bool(n == proto.standard_images),
    )
    if proto.folds:
        result["fold_size"] = int(fold_size)
    return result


# ---------------------------------------------------------------------- scoring a split
def score_split(
    model: MatchingModel,
    split: PrecompSplit,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    chunk_bytes: int = 512 << 20,
    options: ScoringOptions | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Score every image of ``split`` against every caption with ``model.score``.

    Images are encoded once and kept on the device; captions are encoded in length buckets
    and scored in groups of about ``chunk_bytes`` of caption features, so the caption
    features of a large split never exist all at once. The model is put in eval mode
    for the call (its previous mode is restored) and moved to ``device`` when given;
    ``options`` tells the engine how to run (memory budget, precision, workers);
    ``precision`` (``fp32``, ``bf16``, ``auto``) the encoders only, whose features reach the
    engine as float32.

    Returns:
        float32 ``(N_images, N_captions)``, rows images, columns captions in split order.
    """
    check_precision(precision)
    dev = resolve_device(device, model)
    model.to(dev)
    sims = np.empty((split.n_images, split.n_captions), dtype=np.float32)
    with eval_mode(model):
        with inference_precision(precision, dev):
            img, img_len = to_float32(encode_images(model, split, batch_size, dev, progress))
        pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        pending_bytes = 0

        def flush() -> None:
            width = max(f.shape[1] for _, f, _ in pending)
            idx = np.concatenate([i for i, _, _ in pending])
            feats = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1])) for _, f, _ in pending])
            lens = torch.cat([n for _, _, n in pending])
            sims[:, idx] = model.score(img, img_len, feats, lens, options).float().cpu().numpy()
            pending.clear()

        captions = iter_caption_features(model, split, batch_size, dev, progress)
        for idx, feats, lens in encoded_in(precision, dev, captions):
            if pending and pending_bytes + feats.numel() * feats.element_size() > chunk_bytes:
                flush()
                pending_bytes = 0
            pending.append((idx, feats, lens))
            pending_bytes += feats.numel() * feats.element_size()
        if pending:
            flush()
    return sims


def score_image_split(
    model: MatchingModel,
    split: ImageCaptionSplit,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    workers: int = 0,
    options: ScoringOptions | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """:func:`score_split` for a raw-image split (:class:`~eslmatch.data.raw.ImageCaptionSplit`)
    and a model that takes pixels (``model.image_preprocessor()``): every image and every caption is
    encoded once (in ``precision``), then ``model.score`` ranks them.

    Returns:
        float32 ``(N_images, N_captions)``.
    """
    check_precision(precision)
    dev = resolve_device(device, model)
    model.to(dev)
    with eval_mode(model):
        with inference_precision(precision, dev):
            img = to_float32(encode_image_files(model, split, batch_size, workers))
            cap, lens = to_float32(
                embed_caption_texts(
                    model,
                    split.captions,
                    batch_size,
                    dev,
                    lambda i: f"{split.source}: caption {i} of split {split.name}",
                )
            )
        return model.score(img, None, cap, lens, options).float().cpu().numpy()


def encoded_in(precision: str, device: torch.device, items: Iterable[_T]) -> Iterator[_T]:
    """``items`` (a generator that encodes) advanced in ``precision``, each item as float32: the
    code between two items (scoring) runs outside the autocast region."""
    it = iter(items)
    while True:
        with inference_precision(precision, device):
            try:
                item = next(it)
            except StopIteration:
                return
        yield to_float32(item)


def embed_caption_texts(
    model: MatchingModel, texts: Sequence[str], batch_size: int, device: torch.device, where: Callable[[int], str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.embed_captions`` of ``texts``, in order, ``batch_size`` at a time (call in eval mode).

    Args:
        where: caption index -> where it comes from, naming a text the tokenizer refuses.
    Returns:
        ``(features, lengths (M,))`` on ``device``: per-token features ``(M, W, Dt)``
        zero-padded to the longest caption, or one vector per caption ``(M, Dt)``.
    """
    ids = tokenize_each(model.tokenize, texts, where)
    caps = []
    for c0 in range(0, len(ids), batch_size):
        tokens, lens = pad_ids([t.tolist() for t in ids[c0 : c0 + batch_size]])
        caps.append((model.embed_captions(tokens.to(device), lens.to(device)), lens.to(device)))
    width = max(c.shape[1] for c, _ in caps) if caps[0][0].dim() == 3 else None
    if width is not None:  # per-token features: pad to one width
        cap = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c, _ in caps])
    else:
        cap = torch.cat([c for c, _ in caps])
    return cap, torch.cat([n for _, n in caps])


def ensemble(matrices: list[np.ndarray]) -> np.ndarray:
    """Mean of several score matrices of one shape (in float64, as ranked)."""
    if not matrices:
        raise EslmatchError("no score matrices to average")
    shape = matrices[0].shape
    for i, s in enumerate(matrices):
        if s.shape != shape:
            raise EslmatchError(f"score matrix {i + 1} has shape {s.shape}, the first has {shape}")
    total = np.zeros(shape, dtype=np.float64)
    for s in matrices:
        total += s
    return total / len(matrices)


# ---------------------------------------------------------------------- output
def format_metrics(result: dict[str, Any]) -> str:
    """A readable table of an :func:`evaluate_protocol` result."""
    head = f"{'':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}"

    def row(label: str, m: dict[str, float]) -> str:
        return f"{label:<10}{m['r1']:>8.1f}{m['r5']:>8.1f}{m['r10']:>8.1f}{m['medr']:>8.1f}{m['meanr']:>9.2f}"

    lines = []
    proto = PROTOCOLS.get(result.get("protocol", ""))
    title = f"protocol {result.get('protocol')}"
    if proto is not None:
        title += f" ({proto.description})"
    lines.append(title)
    where = f"{result.get('n_images')} images, {result.get('n_captions')} captions"
    if result.get("split"):
        where = f"split {result['split']}: " + where
    if result.get("precision"):
        where += f", encoders in {result['precision']}"
    lines.append(where)
    if result.get("standard_size") is False and proto is not None:
        lines.append(f"note: the published protocol uses {proto.standard_images} images")
    if result.get("models"):
        lines.append("models: " + ", ".join(str(m) for m in result["models"]))
    lines.append("")
    for f, fold in enumerate(result.get("folds", [])):
        lines.append(
            f"fold {f + 1}: i2t R@1 {fold['i2t']['r1']:.1f}  t2i R@1 {fold['t2i']['r1']:.1f}  rsum {fold['rsum']:.1f}"
        )
    if result.get("folds"):
        lines.append("mean over folds:")
    lines.append(head)
    lines.append(row("i2t", result["i2t"]))
    lines.append(row("t2i", result["t2i"]))
    lines.append(f"rsum {result['rsum']:.1f}")
    return "\n".join(lines)
