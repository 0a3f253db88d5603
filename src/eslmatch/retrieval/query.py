"""One search of a gallery with any kind of query (what ``eslmatch search`` runs), computed here
so that a Python caller gets the same result: a :class:`Query` (a sentence, a stored item, a
photo, a stored image of another gallery, or region features), :func:`run_query` ->
:class:`QueryResult` (``to_json()`` is what ``search --json`` prints) and
:func:`format_query_result` (the table).

Importing this module imports neither torch nor FAISS: :meth:`Query.check` refuses a query
before the model loads.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput
from ..utils.messages import note

if TYPE_CHECKING:
    from .filters import Filter
    from .gallery import Gallery
    from .search import Hit
    from .store import GalleryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """What to search with: exactly one of

    - ``text``: a sentence (text -> images, an image gallery);
    - ``similar_to``: the id of a stored item (image -> images, its inner product);
    - ``image_file``: a photo (models that take pixels, e.g. ESL-CLIP);
    - ``image_id``: a stored image of the image gallery at ``image_index`` (image -> captions);
    - ``image_features``: an ``.npy`` of one image's region features ``(R, D)`` or ``(1, R, D)``
      (image -> captions).
    """

    text: str | None = None
    similar_to: str | None = None
    image_file: str | None = None
    image_id: str | None = None
    image_index: str | None = None
    image_features: str | None = None

    def check(self) -> str:
        """The query's kind (``text``, ``similar``, ``file``, ``id`` or ``features``); refused
        unless exactly one is given, whole (a sentence not blank, an id with its gallery, files
        that exist)."""
        kinds = ("text", "similar", "file", "id", "features")
        values = (self.text, self.similar_to, self.image_file, self.image_id, self.image_features)
        given = [kind for kind, value in zip(kinds, values) if value is not None]
        if not given:
            raise InvalidInput(
                'give a query: a sentence (eslmatch search --index INDEX "a red circle"), --similar-to ID, '
                "--image-file PHOTO or --image-id ID"
            )
        if len(given) > 1:
            raise InvalidInput("give one query: a sentence, --similar-to, --image-file, --image-id or --image-features")
        if given[0] == "text" and not (self.text or "").strip():
            raise InvalidInput("the query sentence is empty")
        if given[0] == "id" and not self.image_index:
            raise InvalidInput("--image-id needs --image-index (the image gallery holding that id)")
        for path in (self.image_file, self.image_features):
            if path is not None and not Path(path).is_file():
                raise InvalidInput(f"{path}: no such file")
        return given[0]


@dataclass(frozen=True)
class QueryResult:
    """One search's hits and how they were found.

    Attributes:
        query: the query as given (for ``image_id`` also its image's path, ``None`` if unknown).
        index: where the gallery is; ``kind``, ``stages``: the gallery's.
        k: results asked for; ``rerank_k``: the re-rank depth (``None`` for a one-stage gallery).
        where: the filter's text, or ``None``.
        encoding: how the query was encoded (``fp32``, ``bf16``, ``onnxruntime fp32``).
        seconds: the search's time, the model's loading excluded.
        hits: best first; ``total``: the gallery's items when it was searched.
    """

    query: dict[str, str | None]
    index: str
    kind: str
    stages: int
    k: int
    rerank_k: int | None
    where: str | None
    encoding: str
    seconds: float
    hits: list[Hit]
    total: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``search --json`` prints (``total`` left out, ``seconds`` rounded)."""
        return {
            "query": self.query,
            "index": self.index,
            "kind": self.kind,
            "stages": self.stages,
            "k": self.k,
            "rerank_k": self.rerank_k,
            "where": self.where,
            "encoding": self.encoding,
            "seconds": round(self.seconds, 4),
            "hits": [h.to_dict() for h in self.hits],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as ``search --json`` prints it (two-space indent, UTF-8 kept)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def run_query(
    gallery: Gallery,
    query: Query,
    k: int = 10,
    rerank_k: int | None = 100,
    where: str | Filter | None = None,
    *,
    precision: str | None = None,
    runtime: str = "torch",
) -> QueryResult:
    """Search ``gallery`` with ``query`` (checked against the gallery's kind before the model
    loads): the ``k`` best of the items ``where`` selects, ``rerank_k`` re-scored (two-stage).

    ``precision`` / ``runtime``: those the gallery was opened with; a query encoded otherwise
    than the gallery's items is noted (allowed: the scores differ slightly). A text search
    whose result images are all missing from disk is warned about."""
    kind = query.check()
    flt = gallery.check_filter(where) if where is not None else None
    store = gallery.store
    _check_kind(store, kind)
    searcher = gallery.searcher  # loads the model and checks it is the gallery's
    encoded = str(gallery.encoding)
    _note_mismatch(gallery, precision, runtime)
    start = time.perf_counter()
    asked: dict[str, str | None]
    if kind == "text":
        assert query.text is not None
        hits, asked = searcher.texts([query.text], k, rerank_k, flt)[0], {"text": query.text}
    elif kind == "similar":
        assert query.similar_to is not None
        hits, asked = searcher.similar([query.similar_to], k, flt)[0], {"similar_to": query.similar_to}
    else:
        image, asked = _query_image(gallery, query, kind)
        hits = searcher.images([image], k, rerank_k, flt)[0]
    elapsed = time.perf_counter() - start
    if kind == "text":
        _warn_missing_images(store.where, hits)
    return QueryResult(
        query=asked,
        index=store.where,
        kind=store.kind,
        stages=store.stages,
        k=k,
        rerank_k=None if store.stages == 1 else rerank_k,
        where=None if flt is None else flt.text,
        encoding=encoded,
        seconds=elapsed,
        hits=hits,
        total=len(gallery),
    )


def format_query_result(result: QueryResult) -> str:
    """:func:`run_query`'s result as ``search`` prints it: a table of the hits and a summary."""
    caption = result.kind == "caption"
    lines = [f"{'rank':>4}  {'score':>9}  {'first':>9}  {'id':<16} {'caption' if caption else 'path'}"]
    for h in result.hits:
        shown = h.caption if caption else (h.path or "")
        lines.append(f"{h.rank:>4}  {h.score:>9.4f}  {h.first_stage_score:>9.4f}  {h.id:<16} {shown}")
    exact = ", one-stage: exact scores, no re-rank" if result.stages == 1 else ""
    filtered = f", filter {result.where}" if result.where else ""
    lines.append(f"({len(result.hits)} of {result.total}, {result.seconds * 1000:.0f} ms{exact}{filtered})")
    return "\n".join(lines)


def _check_kind(store: GalleryStore, kind: str) -> None:
    """Refuse a query the gallery's kind cannot answer."""
    if kind in ("text", "similar") and store.kind != "image":
        raise InvalidInput(
            f"{store.where} is a caption index: query it with --image-id/--image-index, --image-features or --image-file"
        )
    if kind in ("id", "features") and store.kind != "caption":
        raise InvalidInput(
            f"{store.where} is an image gallery: --{'image-id' if kind == 'id' else 'image-features'} queries a "
            "caption index"
        )


def _query_image(gallery: Gallery, query: Query, kind: str) -> tuple[Any, dict[str, str | None]]:
    """The query image of an image query (a photo, another gallery's stored image, region
    features) for :meth:`~.search.Searcher.images`, and the query as given."""
    if kind == "file":
        assert query.image_file is not None
        if gallery.model.inputs != "pixels":
            raise InvalidInput(
                "--image-file needs a model that takes images (e.g. ESL-CLIP); this one reads region features: give "
                "--image-features (made by 'eslmatch extract'), or --similar-to ID for a stored image"
            )
        return Path(query.image_file), {"image_file": query.image_file}
    if kind == "id":
        from .gallery import open_gallery

        assert query.image_id is not None and query.image_index is not None
        images = open_gallery(query.image_index, model=gallery.model)
        image = images.searcher.stored(query.image_id)
        return image, {"image_id": query.image_id, "image_path": images.metadata(query.image_id)["path"] or None}
    import numpy as np

    assert query.image_features is not None
    try:
        feats = np.load(query.image_features, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{query.image_features}: not a readable .npy array ({exc})") from None
    return feats, {"image_features": query.image_features}


def _note_mismatch(gallery: Gallery, precision: str | None, runtime: str) -> None:
    """One note when the query is encoded otherwise than the gallery's items."""
    from .describe import encodings

    enc = encodings(gallery.store, gallery.device, precision, runtime)
    if enc["mismatch"]:
        note(
            log,
            f"the query is encoded in {enc['queries']}, the gallery in {' and '.join(enc['gallery'])} "
            "(allowed; scores differ slightly from those of matching encoders)",
        )


def _warn_missing_images(where: str, hits: list[Hit]) -> None:
    """A warning when every result image recorded is missing (features without images still search)."""
    recorded = [h.path for h in hits if h.path]
    missing = [p for p in recorded if not Path(p).is_file()]
    if recorded and len(missing) == len(recorded):
        log.warning(
            f"{where}: the result images are missing, e.g. {missing[0]} (moved or deleted? rebuild the gallery "
            "where the images are now)"
        )
