"""``eslmatch search``: a gallery searched with a sentence, a photo, or one of its items.

Text -> images on an image gallery (``TEXT``); image -> images (``--similar-to ID``, or
``--image-file PHOTO`` for a model that takes pixels); image -> captions on a caption index
(``--image-id ID --image-index IMAGE_INDEX``, ``--image-features FILE.npy``, ``--image-file``).
``--where EXPR`` restricts every kind to the items a filter selects. The query, the filter and
the gallery are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from ._gallery import check_encoding_args, encoding_args, gallery_args, gallery_target, open_from_args

if TYPE_CHECKING:
    from ..retrieval.filters import Filter
    from ..retrieval.query import Query

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


def _check(args: argparse.Namespace) -> tuple[Query, Filter | None]:
    """Everything that can be refused before the model loads: counts, the query, the filter."""
    if args.k < 1:
        raise EslmatchError(f"-k must be a positive integer, got {args.k}")
    if args.rerank_k < 0:
        raise EslmatchError(f"--rerank-k must be 0 or more, got {args.rerank_k}")
    gallery_target(args)
    from ..retrieval.query import Query

    query = Query(args.text, args.similar_to, args.image_file, args.image_id, args.image_index, args.image_features)
    query.check()
    check_encoding_args(args)
    if args.where is None:
        return query, None
    from ..retrieval.filters import parse_filter

    return query, parse_filter(args.where)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, open the gallery, print :func:`~eslmatch.retrieval.query.run_query`'s result."""
    query, where = _check(args)
    from ..retrieval.query import format_query_result, run_query

    gallery = open_from_args(args, verify=args.verify)
    params = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    gallery.store.search_params.update({k: v for k, v in params.items() if v is not None})
    result = run_query(gallery, query, args.k, args.rerank_k, where, precision=args.precision, runtime=args.runtime)
    print(result.to_json() if args.json else format_query_result(result))
    return 0
