"""One searcher over any store: tokenise -> encode -> shortlist -> re-rank.

Two-stage retrieval (ESL, as ALBEF/BLIP): the first stage ranks the live items by the exact
inner product of the first-stage vectors (a pair's mean word-region affinity, spec section 3);
the ``rerank_k`` best are scored with the full ESL score (attention pooling, spec section 4,
:meth:`~eslmatch.model.base.MatchingModel.score_prepared` on the stored sides) and the ``k``
best by that score are returned. One-stage retrieval (``exact_index``: VSE, ESL-CLIP): the
inner product of the index vectors IS the score; ``rerank_k`` is ignored.

Rules for ``k`` and ``rerank_k`` (``N`` live items, two-stage): ``k`` must be >= 1; ``k > N``
returns all ``N``; ``rerank_k <= 0`` (or ``None``): first stage only; ``0 < rerank_k < k`` is
raised to ``k``; ``rerank_k >= N`` scores every item (the exhaustive ranking). Ties go to the
lower row. ``where`` (a filter, :mod:`.filters`) restricts every stage to the items it selects.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import eval_mode
from ..errors import EslmatchError
from ..model.base import MatchingModel
from ..scoring import ScoringOptions
from .encode import ImageQuery, caption_words, encode_image_query, encode_texts
from .encoding import Encoding, default_encoding
from .filters import Filter, as_filter, check
from .models import check_model
from .policy import item_record
from .store import GalleryStore

QUERY_BATCH = 64


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        rank: 1-based position in the result list.
        id: the item's id; ``path``: its image (for a caption, the caption's image), or ``None``.
        score: the ESL score (the first-stage score when re-ranking is off); for a one-stage
            gallery the inner product of the index vectors, which is the model's score.
        first_stage_score: the first-stage inner product (one-stage: the same as ``score``).
        index: the item's row in the store.
        caption: the caption text (caption galleries).
        metadata: the item's metadata fields (``folder``, ``taken``, the user's).
    """

    rank: int
    id: str
    path: str | None
    score: float
    first_stage_score: float
    index: int
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k) for k in ("rank", "id", "path", "score", "first_stage_score", "index")
        }
        if self.caption is not None:
            out["caption"] = self.caption
        out["metadata"] = dict(self.metadata)
        return out


def plan_depth(k: int, rerank_k: int | None, n: int) -> tuple[int, int, bool]:
    """``(k, shortlist size, re-rank?)`` for ``n`` items (rules in the module doc)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise EslmatchError(f"k must be a positive integer, got {k!r}")
    k = max(1, min(int(k), n))
    if rerank_k is None or rerank_k <= 0:
        return k, k, False
    return k, max(1, min(max(int(rerank_k), k), n)), True


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


class Searcher:
    """Searches ``store`` with ``model`` (checked once: the model the gallery was built with).

    ``scoring``: how the re-rank's engine runs (budget, precision, workers); ``encoding``: how
    the queries are encoded (:class:`~.encode.Encoding`; default: in the precision the gallery
    records, fp32 for galleries that record none). The scores keep ``scoring``'s precision."""

    def __init__(
        self,
        model: MatchingModel,
        store: GalleryStore,
        scoring: ScoringOptions | None = None,
        encoding: Encoding | None = None,
    ) -> None:
        check_model(store.manifest["model"], store.stages, model, store.where)
        self.model, self.store = model, store
        self.scoring = scoring or ScoringOptions()
        self.encoding = encoding or default_encoding(store.manifest.get("encoding"), model.device)

    @property
    def one_stage(self) -> bool:
        return self.store.stages == 1

    def _where(self, where: str | Filter | None) -> Filter | None:
        flt = as_filter(where)
        return None if flt is None else check(flt, self.store.info()["fields"])

    # ------------------------------------------------------------------ text -> items
    def texts(
        self,
        texts: Sequence[str],
        k: int = 10,
        rerank_k: int | None = 100,
        where: str | Filter | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """Items of an image gallery for each sentence, best first."""
        if self.store.kind != "image":
            raise EslmatchError(f"{self.store.where}: text search needs an image gallery; this is a caption index")
        if isinstance(texts, str):
            texts = [texts]
        flt = self._where(where)
        clock = _Clock(timings)
        out: list[list[Hit]] = []
        with self.store.snapshot():
            kk, depth, rerank = plan_depth(k, None if self.one_stage else rerank_k, max(1, self.store.info()["count"]))
            for b0 in range(0, len(texts), QUERY_BATCH):
                q = encode_texts(self.model, texts[b0 : b0 + QUERY_BATCH], self.encoding)
                clock.lap("encode")
                fs, rows = self._first(q.vectors, kk, depth, flt)
                clock.lap("first_stage")
                for j in range(fs.shape[0]):
                    query = None
                    if rerank and q.feats is not None:
                        w = int(q.lengths[j])
                        query = (q.feats[j : j + 1, :w], q.lengths[j : j + 1].to(q.feats.device))
                    out.append(self._hits(fs[j], rows[j], kk, query))
                clock.lap("rerank")
        return out

    def _first(self, vectors: np.ndarray, k: int, depth: int, flt: Filter | None) -> tuple[np.ndarray, np.ndarray]:
        """The first stage; one-stage: deep enough that every item tied with the ``k``-th is a
        candidate (ties go to the lower row, as everywhere)."""
        if not self.one_stage:
            return self.store.first_stage(vectors, depth, flt)
        n = max(1, self.store.info()["count"])
        depth = min(k + 1, n)
        while True:
            fs, rows = self.store.first_stage(vectors, depth, flt)
            last = rows[:, -1] >= 0
            if depth >= n or not np.any(last & (fs[:, -1] >= fs[:, min(k, depth) - 1])):
                return fs, rows
            depth = min(2 * depth, n)

    # ------------------------------------------------------------------ image -> items
    def images(
        self,
        queries: Sequence[Any],
        k: int = 10,
        rerank_k: int | None = 100,
        where: str | Filter | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """For each query image: the captions of a caption index (image -> text, re-ranked by
        ESL), or the images of an image gallery (image -> image: inner product of the
        first-stage / index vectors). A query is an image file (:class:`~pathlib.Path`; a
        ``str`` is text, not a file), a PIL image, pixels or region features, or
        :class:`ImageQuery`."""
        flt = self._where(where)
        clock = _Clock(timings)
        for q in queries:
            if isinstance(q, str):
                raise EslmatchError(
                    f"a query image given as the str {q!r}: pass Path({q!r}) for an image file, or "
                    f"searcher.stored({q!r}) / similar([{q!r}]) for a stored item's id"
                )
        encoded = [
            q if isinstance(q, ImageQuery) else encode_image_query(self.model, q, self.encoding) for q in queries
        ]
        mine = self.store.manifest["model"].get("fingerprint")
        if any(q.fingerprint not in (None, mine) for q in encoded):
            raise EslmatchError(f"a query image comes from a gallery built with another model than {self.store.where}")
        clock.lap("encode")
        caption = self.store.kind == "caption"
        out: list[list[Hit]] = []
        with self.store.snapshot():
            kk, depth, rerank = plan_depth(
                k, None if self.one_stage or not caption else rerank_k, max(1, self.store.info()["count"])
            )
            for b0 in range(0, len(encoded), QUERY_BATCH):
                batch = encoded[b0 : b0 + QUERY_BATCH]
                fs, rows = self._first(np.stack([q.vector for q in batch]), kk, depth, flt)
                clock.lap("first_stage")
                for j, q in enumerate(batch):
                    side = q.side if rerank and caption else None
                    out.append(self._hits(fs[j], rows[j], kk, side))
                clock.lap("rerank")
        return out

    def stored(self, item_id: str) -> ImageQuery:
        """A stored image of this gallery as a query (its vector and, two-stage, its side),
        e.g. for a caption index built with the same model (image -> text)."""
        with self.store.snapshot():
            row = item_record(self.store, item_id, ()).row
            side = None
            if not self.one_stage:
                side = torch.from_numpy(self._side(row))[None].to(self.model.device)
            return ImageQuery(self.store.vectors([row])[0], side, self.store.manifest["model"].get("fingerprint"))

    def similar(self, item_ids: Sequence[str], k: int = 10, where: str | Filter | None = None) -> list[list[Hit]]:
        """Items most like each stored item ``id`` (itself excluded): the inner product of the
        stored first-stage / index vectors (ESL has no image-image score; see docs/retrieval.md)."""
        flt = self._where(where)
        out = []
        with self.store.snapshot():
            rows = [item_record(self.store, i, ()).row for i in item_ids]
            vectors = self.store.vectors(rows)
            n = max(1, self.store.info()["count"])
            kk = plan_depth(k, None, n)[0]
            fs, found = self._first(vectors, min(kk + 1, n), min(kk + 1, n), flt)
            for j, row in enumerate(rows):
                keep = found[j] != row
                hits = self._hits(fs[j][keep], found[j][keep], kk, None)
                out.append(hits)
        return out

    # ------------------------------------------------------------------ results
    def _hits(self, fs: np.ndarray, rows: np.ndarray, k: int, query: Any) -> list[Hit]:
        keep = rows >= 0
        fs, rows = fs[keep], rows[keep].astype(np.int64)
        scores = self._rerank(query, rows) if query is not None and rows.size else fs.astype(np.float64)
        order = np.lexsort((rows, -scores))[:k]  # best score first, ties by row
        recs = {r.row: r for r in self.store.select(rows=rows[order].tolist())}
        out: list[Hit] = []
        for j in order:
            rec = recs.get(int(rows[j]))
            if rec is None:  # deleted by another process since the shortlist (Milvus forgets it at once)
                continue
            out.append(
                Hit(
                    len(out) + 1,
                    rec.id,
                    rec.path or None,
                    float(scores[j]),
                    float(fs[j]),
                    int(rows[j]),
                    rec.caption,
                    rec.metadata,
                )
            )
        return out

    def _side(self, row: int) -> np.ndarray:
        """The stored side of one item, real regions only: ``(R_i, Dt)`` float32."""
        side, lens = self.store.sides(np.asarray([row]))
        return side[0, : int(lens[0])]

    def _rerank(self, query: Any, rows: np.ndarray) -> np.ndarray:
        """ESL scores ``(len(rows),)`` of the query against the stored rows."""
        dev = self.model.device
        side, lens = self.store.sides(rows)
        items = torch.from_numpy(side).to(dev)
        item_lens = torch.from_numpy(lens).to(dev)
        with eval_mode(self.model):
            if self.store.kind == "image":
                cap, cap_len = query
                s = self.model.score_prepared(items, item_lens, cap, cap_len, self.scoring)[:, 0]
            else:
                img_len = torch.full((1,), query.shape[1], dtype=torch.long, device=dev)
                s = self.model.score_prepared(query.to(dev), img_len, items, item_lens, self.scoring)[0]
        return s.detach().double().cpu().numpy()

    # ------------------------------------------------------------------ explanation
    def attention(self, text: str, item_id: str) -> tuple[list[str], np.ndarray, tuple[int, int] | None]:
        """Word-by-region attention of ``text`` over the stored image ``item_id``: ``(words,
        weights (W, R_i), grid)`` (each row the text-to-image softmax of spec section 4 over
        the image's real regions; ``grid`` ``(h, w)`` when the regions form one, else ``None``)."""
        if self.store.kind != "image" or self.one_stage:
            raise EslmatchError(
                f"{self.store.where}: word-by-region attention needs a two-stage image index of an ESL model; "
                "this one stores one vector per item"
            )
        q = encode_texts(self.model, [text], self.encoding)
        assert q.feats is not None
        w = int(q.lengths[0])
        with self.store.snapshot():
            side = torch.from_numpy(self._side(item_record(self.store, item_id, ()).row))
        with eval_mode(self.model):
            weights = self.model.attention(q.feats[0, :w], side.to(q.feats.device))
        ids, _ = self.model.tokenize([text])
        n = side.shape[0]
        grid = self.store.grid if self.store.grid is not None and self.store.grid[0] * self.store.grid[1] == n else None
        return caption_words(self.model, text, ids[0, :w]), weights.double().cpu().numpy(), grid
