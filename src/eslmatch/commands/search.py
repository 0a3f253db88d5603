"""``eslmatch search --index INDEX "TEXT"``: retrieval over a gallery index (two-stage for
ESL, one-stage and exact for single-vector models).

Text -> images on an image index; image -> captions on a caption index with ``--image-id ID
--image-index IMAGE_INDEX``, ``--image-features FILE.npy`` (models of region features) or
``--image-file PHOTO`` (models that take pixels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EslmatchError
from ..retrieval import GalleryIndex
from ..utils import resolve_device
from .index import load_index_model, milvus_args, need_collection

ORDER = 61


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "search",
        help="search a gallery index with a sentence (or an image, on a caption index)",
    )
    s.add_argument("text", nargs="?", help="the query sentence (image index)")
    s.add_argument("--index", help="index directory ('eslmatch index build')")
    milvus_args(s, "search")
    s.add_argument(
        "-k",
        "--top-k",
        dest="k",
        type=int,
        default=10,
        help="results to return (default 10)",
    )
    s.add_argument(
        "--rerank-k",
        type=int,
        default=100,
        help="first-stage candidates re-scored with ESL (default 100; 0: first stage only); "
        "ignored by one-stage indexes, whose first stage is exact",
    )
    s.add_argument(
        "--model",
        help="model directory or .pth.tar (default: the one recorded in the index)",
    )
    s.add_argument("--text-model", help="tokenizer for released checkpoints")
    s.add_argument("--image-id", help="query image id (reverse search on a caption index)")
    s.add_argument("--image-index", help="image index holding --image-id")
    s.add_argument(
        "--image-features",
        help=".npy of one image's region features (R, D) or (1, R, D)",
    )
    s.add_argument("--image-file", help="a photo to query with (models that take pixels, e.g. ESL-CLIP)")
    s.add_argument(
        "--nprobe",
        type=int,
        help="IVF clusters searched (overrides the index's setting)",
    )
    s.add_argument(
        "--ef-search",
        type=int,
        help="HNSW search beam width (overrides the index's setting)",
    )
    s.add_argument(
        "--verify",
        action="store_true",
        help="check every file's sha256 before searching",
    )
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    index: GalleryIndex
    if need_collection(args, "index"):
        from ..retrieval.milvus import MilvusGallery

        index = MilvusGallery.open(args.milvus, args.collection, timeout=args.milvus_timeout)
        args.index = str(index.path)
    else:
        index = GalleryIndex.open(args.index, verify=args.verify)
    model = load_index_model(args.model, index.manifest, str(resolve_device(args.device)), args.text_model)
    index.check_model(model)
    index.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    image_query = args.image_id is not None or args.image_features is not None or args.image_file is not None
    start = time.perf_counter()
    if index.kind == "image":
        if image_query:
            raise EslmatchError(f"{args.index} is an image index: image queries need a caption index")
        if not args.text:
            raise EslmatchError('give the query sentence (eslmatch search --index INDEX "a red circle")')
        hits = index.search_text(model, args.text, k=args.k, rerank_k=args.rerank_k)
        query = {"text": args.text}
        recorded = [h.path for h in hits if h.path]
        missing = [p for p in recorded if not Path(p).is_file()]
        if recorded and len(missing) == len(recorded):  # a warning: features without images still search
            print(
                f"eslmatch: warning: {args.index}: the result images are missing, e.g. {missing[0]} (moved or "
                "deleted? rebuild the index where the images are now)",
                file=sys.stderr,
            )
    else:
        if args.text:
            raise EslmatchError(
                f"{args.index} is a caption index: query it with --image-id/--image-index, --image-features or --image-file"
            )
        if args.image_id is not None:
            if not args.image_index:
                raise EslmatchError("--image-id needs --image-index (the image index holding that id)")
            image_index = GalleryIndex.open(args.image_index)
            hits = index.search_image(
                model,
                args.image_id,
                k=args.k,
                rerank_k=args.rerank_k,
                image_index=image_index,
            )
            query = {
                "image_id": args.image_id,
                "image_path": image_index.image_path(args.image_id),
            }
        elif args.image_file is not None:
            if not hasattr(model, "preprocess"):
                raise EslmatchError(
                    "--image-file needs a model that takes images (e.g. ESL-CLIP); this one reads region "
                    "features: give --image-features"
                )
            hits = index.search_image(model, Path(args.image_file), k=args.k, rerank_k=args.rerank_k)
            query = {"image_file": args.image_file}
        elif args.image_features is not None:
            try:
                feats = np.load(args.image_features, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise EslmatchError(f"{args.image_features}: not a readable .npy array ({exc})") from exc
            hits = index.search_image(model, feats, k=args.k, rerank_k=args.rerank_k)
            query = {"image_features": args.image_features}
        else:
            raise EslmatchError(
                "a caption index is queried with --image-id ID --image-index INDEX, --image-features FILE.npy "
                "or --image-file PHOTO"
            )
    elapsed = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "query": query,
                    "index": str(index.path),
                    "kind": index.kind,
                    "stages": index.stages,
                    "k": args.k,
                    "rerank_k": None if index.one_stage else args.rerank_k,
                    "seconds": round(elapsed, 4),
                    "hits": [h.to_dict() for h in hits],
                },
                indent=2,
            )
        )
        return 0
    label = "caption" if index.kind == "caption" else "path"
    print(f"{'rank':>4}  {'score':>9}  {'first':>9}  {'id':<16} {label}")
    for h in hits:
        shown = h.caption if index.kind == "caption" else (h.path or "")
        print(f"{h.rank:>4}  {h.score:>9.4f}  {h.first_stage_score:>9.4f}  {h.id:<16} {shown}")
    exact = ", one-stage: exact scores, no re-rank" if index.one_stage else ""
    print(f"({len(hits)} of {index.count}, {elapsed * 1000:.0f} ms{exact})")
    return 0
