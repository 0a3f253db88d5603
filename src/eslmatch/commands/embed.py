"""``eslmatch embed --model M (--images DIR | --features DATA | --captions FILE) --out OUT``:
a model's index vectors to ``.npy`` (+ ``.ids.txt``) or ``.parquet``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.choices import PRECISIONS

ORDER = 35


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "embed",
        help="write a model's index vectors of photos, region features or captions to .npy / .parquet",
        description="The vectors whose inner product is the one-stage score (VSE, ESL-CLIP), or ESL's "
        "first-stage global vectors: index_vectors_images(embed_images(x)) / index_vectors_captions(...). "
        "OUT.npy is float32 (N, K) with the ids in OUT.ids.txt; OUT.parquet has id and vector columns. "
        "An interrupted run resumes from its finished chunks.",
    )
    s.add_argument("--model", required=True, metavar="MODEL", help="a model folder or a released checkpoint")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="a folder of photos (models that take pixels: ESL-CLIP)")
    src.add_argument(
        "--features",
        metavar="DATA",
        help="region features (ESL, VSE): a precomp folder (its --split) or an (N, R, D) .npy file",
    )
    src.add_argument("--captions", metavar="FILE", help="one caption per line (ID<TAB>caption gives the id)")
    s.add_argument("--out", required=True, metavar="OUT", help="OUT.npy or OUT.parquet (parquet needs pyarrow)")
    s.add_argument("--split", default="test", help="split of a precomp folder given to --features (default test)")
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder precision: fp32, bf16 (autocast) or auto = bf16 where the device computes it natively "
        "(default auto)",
    )
    s.add_argument("--batch-size", type=int, default=64, help="items per encoder call (default 64)")
    s.add_argument("--chunk", type=int, default=1024, help="items per resumable chunk (default 1024)")
    s.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default auto)")
    s.add_argument(
        "--text-model",
        metavar="DIR",
        help="tokenizer for a released checkpoint (default: the model's own; a released one stores none)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..extract.embed import check_output

    # Refuse what can be refused before the model loads.
    out = check_output(args.out)
    for name in ("batch_size", "chunk"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    given = Path(args.images or args.features or args.captions)
    if not given.exists():
        raise InputError(f"{given}: no such file or folder")
    from ..extract.embed import caption_items, embed_to_file, feature_items, kind_of, photo_items
    from ..factory import load_model, model_format
    from ..utils import resolve_device

    model_format(args.model)
    device = resolve_device(args.device)
    model = load_model(args.model, map_location=device, text_model=args.text_model)
    if args.images:
        source = photo_items(model, args.images)
    elif args.features:
        source = feature_items(model, args.features, args.split)
    else:
        source = caption_items(model, args.captions)
    summary = embed_to_file(
        model,
        source,
        out,
        precision=args.precision,
        batch_size=args.batch_size,
        chunk=args.chunk,
        progress=not args.no_progress,
    )
    print(
        f"embedded {summary['count']} {kind_of(source)} -> {', '.join(summary['files'])} "
        f"({summary['count']}, {summary['dim']}) in {summary['precision']} on {device}"
    )
    if summary["reused_chunks"]:
        print(f"resumed: {summary['reused_chunks']} chunks reused, {summary['computed']} items computed now")
    for name, reason in summary["skipped"][:20]:
        print(f"  skipped {name}: {reason}")
    return 0
