"""``eslmatch search``: a gallery searched with a sentence, a photo, or one of its items.

Text -> images on an image gallery (``TEXT``); image -> images (``--similar-to ID``, or
``--image-file PHOTO`` for a model that takes pixels); image -> captions on a caption index
(``--image-id ID --image-index IMAGE_INDEX``, ``--image-features FILE.npy``, ``--image-file``).
``--where EXPR`` restricts every kind to the items a filter selects. The query, the filter and
the gallery are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import EslmatchError
from ._gallery import check_encoding_args, encoding_args, gallery_args, gallery_target, open_from_args

ORDER = 61


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("search", help="search a gallery with a sentence, a photo or one of its items")
    s.add_argument("text", nargs="?", help="the query sentence (an image gallery)")
    gallery_args(s, "search")
    s.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="results to return (default 10)")
    s.add_argument(
        "--rerank-k",
        type=int,
        default=100,
        help="first-stage candidates re-scored with ESL (default 100; 0: first stage only); ignored by one-stage "
        "galleries, whose first stage is exact",
    )
    s.add_argument(
        "--where",
        metavar="EXPR",
        help="only items this filter selects, e.g. 'folder == \"trips\"' (default: all items)",
    )
    s.add_argument(
        "--similar-to",
        metavar="ID",
        help="items most like this stored item, image -> image (one of TEXT / --similar-to / --image-file / --image-id / --image-features)",
    )
    s.add_argument(
        "--image-file",
        help="a photo to query with, models that take pixels, e.g. ESL-CLIP (one of the query kinds, as --similar-to)",
    )
    s.add_argument(
        "--image-id",
        help="query image id, image -> text on a caption index; needs --image-index (one of the query kinds, as --similar-to)",
    )
    s.add_argument("--image-index", help="the image gallery holding --image-id (required with --image-id)")
    s.add_argument(
        "--image-features",
        help=".npy of one image's region features (R, D) or (1, R, D) (one of the query kinds, as --similar-to)",
    )
    s.add_argument("--model", help="model directory or checkpoint (default: the one the gallery records)")
    s.add_argument("--text-model", help="tokenizer of a released checkpoint (default: the recorded one)")
    s.add_argument("--nprobe", type=int, help="IVF clusters searched (default: the gallery's setting)")
    s.add_argument("--ef-search", type=int, help="HNSW search beam width (default: the gallery's setting)")
    s.add_argument("--verify", action="store_true", help="check every file's sha256 before searching")
    s.add_argument("--device", default="cpu", help="torch device for the model: cpu (default), cuda, cuda:N or auto")
    s.add_argument("--json", action="store_true", help="print the hits (with their metadata) as JSON")
    encoding_args(s, "the query", None)
    s.set_defaults(func=run)


def _query_kind(args: argparse.Namespace) -> str:
    given = [
        name
        for name, value in (
            ("text", args.text),
            ("similar", args.similar_to),
            ("file", args.image_file),
            ("id", args.image_id),
            ("features", args.image_features),
        )
        if value is not None
    ]
    if not given:
        raise EslmatchError(
            'give a query: a sentence (eslmatch search --index INDEX "a red circle"), --similar-to ID, --image-file PHOTO or --image-id ID'
        )
    if len(given) > 1:
        raise EslmatchError("give one query: a sentence, --similar-to, --image-file, --image-id or --image-features")
    if given[0] == "text" and not args.text.strip():
        raise EslmatchError("the query sentence is empty")
    if given[0] == "id" and not args.image_index:
        raise EslmatchError("--image-id needs --image-index (the image gallery holding that id)")
    for path in (args.image_file, args.image_features):
        if path is not None and not Path(path).is_file():
            raise EslmatchError(f"{path}: no such file")
    return given[0]


def _check(args: argparse.Namespace) -> tuple[str, Any]:
    """Everything that can be refused before the model loads: counts, the query, the filter."""
    if args.k < 1:
        raise EslmatchError(f"-k must be a positive integer, got {args.k}")
    if args.rerank_k < 0:
        raise EslmatchError(f"--rerank-k must be 0 or more, got {args.rerank_k}")
    gallery_target(args)
    kind = _query_kind(args)
    check_encoding_args(args)
    if args.where is None:
        return kind, None
    from ..retrieval.filters import parse_filter

    return kind, parse_filter(args.where)


def run(args: argparse.Namespace) -> int:
    kind, where = _check(args)
    gallery = open_from_args(args, verify=args.verify)
    if where is not None:
        gallery.check_filter(where)
    store = gallery.store
    if kind in ("text", "similar") and store.kind != "image":
        raise EslmatchError(
            f"{store.where} is a caption index: query it with --image-id/--image-index, --image-features or --image-file"
        )
    if kind in ("id", "features") and store.kind != "caption":
        raise EslmatchError(
            f"{store.where} is an image gallery: --{'image-id' if kind == 'id' else 'image-features'} queries a caption index"
        )
    store.search_params.update(
        {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    )
    _ = gallery.searcher  # loads the model and checks it is the gallery's
    encoded = str(gallery.encoding)
    _note_mismatch(gallery, args)
    start = time.perf_counter()
    hits, query = _search(args, gallery, kind, where)
    elapsed = time.perf_counter() - start
    if kind == "text":
        _warn_missing_images(store.where, hits)
    if args.json:
        payload = {
            "query": query,
            "index": store.where,
            "kind": store.kind,
            "stages": store.stages,
            "k": args.k,
            "rerank_k": None if store.stages == 1 else args.rerank_k,
            "where": args.where,
            "encoding": encoded,
            "seconds": round(elapsed, 4),
            "hits": [h.to_dict() for h in hits],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    label = "caption" if store.kind == "caption" else "path"
    print(f"{'rank':>4}  {'score':>9}  {'first':>9}  {'id':<16} {label}")
    for h in hits:
        shown = h.caption if store.kind == "caption" else (h.path or "")
        print(f"{h.rank:>4}  {h.score:>9.4f}  {h.first_stage_score:>9.4f}  {h.id:<16} {shown}")
    exact = ", one-stage: exact scores, no re-rank" if store.stages == 1 else ""
    filtered = f", filter {args.where}" if args.where else ""
    print(f"({len(hits)} of {len(gallery)}, {elapsed * 1000:.0f} ms{exact}{filtered})")
    return 0


def _search(args: argparse.Namespace, gallery: Any, kind: str, where: Any) -> tuple[list[Any], dict[str, Any]]:
    if kind == "text":
        return gallery.searcher.texts([args.text], args.k, args.rerank_k, where)[0], {"text": args.text}
    if kind == "similar":
        return gallery.searcher.similar([args.similar_to], args.k, where)[0], {"similar_to": args.similar_to}
    if kind == "file":
        if gallery.model.inputs != "pixels":
            raise EslmatchError(
                "--image-file needs a model that takes images (e.g. ESL-CLIP); this one reads region features: give "
                "--image-features (made by 'eslmatch extract'), or --similar-to ID for a stored image"
            )
        query: Any = Path(args.image_file)
        return gallery.searcher.images([query], args.k, args.rerank_k, where)[0], {"image_file": args.image_file}
    if kind == "id":
        from ..retrieval import open_gallery

        images = open_gallery(args.image_index, model=gallery.model)
        query = images.searcher.stored(args.image_id)
        hits = gallery.searcher.images([query], args.k, args.rerank_k, where)[0]
        return hits, {"image_id": args.image_id, "image_path": images.metadata(args.image_id)["path"] or None}
    import numpy as np

    try:
        feats = np.load(args.image_features, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EslmatchError(f"{args.image_features}: not a readable .npy array ({exc})") from None
    return gallery.searcher.images([feats], args.k, args.rerank_k, where)[0], {"image_features": args.image_features}


def _note_mismatch(gallery: Any, args: argparse.Namespace) -> None:
    """One note on stderr when the query is encoded otherwise than the gallery's items."""
    from ..retrieval.describe import encodings

    enc = encodings(gallery.store, gallery.device, args.precision, args.runtime)
    if enc["mismatch"]:
        print(
            f"eslmatch: note: the query is encoded in {enc['queries']}, the gallery in {' and '.join(enc['gallery'])} "
            "(allowed; scores differ slightly from those of matching encoders)",
            file=sys.stderr,
        )


def _warn_missing_images(where: str, hits: list[Any]) -> None:
    recorded = [h.path for h in hits if h.path]
    missing = [p for p in recorded if not Path(p).is_file()]
    if recorded and len(missing) == len(recorded):  # a warning: features without images still search
        print(
            f"eslmatch: warning: {where}: the result images are missing, e.g. {missing[0]} (moved or deleted? rebuild "
            "the gallery where the images are now)",
            file=sys.stderr,
        )
