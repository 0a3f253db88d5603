"""``eslmatch index build|add|info|reindex``: gallery indexes (two-stage for ESL, one-stage
and exact for single-vector models: VSE, ESL-CLIP).

``index build`` of a sharded image index also runs under ``torchrun`` (every process encodes
its share of the shards, rank 0 writes the rest; see docs/retrieval.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import EslmatchError
from ..extract.distributed import ExtractJob, JobFailed
from ..factory import load_model
from ..retrieval import (
    FaissOptions,
    GalleryIndex,
    add_to_index,
    build_caption_index,
    build_image_index,
    is_one_stage,
    rebuild_faiss,
    takes_pixels,
)
from ..retrieval.store import read_manifest
from ..utils import resolve_device

ORDER = 60


def _faiss_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--faiss",
        choices=("flat", "ivf", "hnsw", "ivfpq"),
        default=default,
        help="first-stage index: flat (exact inner product, default), ivf or hnsw (large galleries), ivfpq "
        "(IVF + product codes re-scored exactly: millions of items; see docs/retrieval.md)",
    )
    p.add_argument("--nlist", type=int, help="IVF clusters (default: sqrt(N); ivfpq: 4 sqrt(N) to a power of two)")
    p.add_argument(
        "--nprobe",
        type=int,
        help="IVF clusters searched per query (default: max(16, nlist/4))",
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree (default 32)")
    p.add_argument(
        "--ef-construction",
        type=int,
        default=80,
        help="HNSW build beam width (default 80)",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        default=256,
        help="HNSW search beam width (default 256)",
    )


def milvus_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--milvus URI --collection NAME --milvus-timeout S``: use a Milvus gallery (docs/milvus.md)."""
    p.add_argument("--milvus", metavar="URI", help=f"{what} a gallery in Milvus at URI (e.g. http://127.0.0.1:19530)")
    p.add_argument("--collection", help="the Milvus collection (with --milvus)")
    p.add_argument(
        "--milvus-timeout", type=float, default=30.0, help="seconds a Milvus call may take, retries included (30)"
    )


def need_collection(args: argparse.Namespace, place: str) -> bool:
    """True for a Milvus gallery (``--milvus``); refuses a half-given or doubly-given place."""
    if args.milvus is None:
        if args.collection is not None:
            raise EslmatchError("--collection needs --milvus URI")
        if not getattr(args, place, None):
            raise EslmatchError(f"give --{place} (an index directory) or --milvus URI --collection NAME")
        return False
    if not args.collection:
        raise EslmatchError("--milvus needs --collection NAME")
    if getattr(args, place, None):
        raise EslmatchError(f"give --{place} or --milvus, not both")
    return True


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("index", help="build, extend or describe a gallery index for 'eslmatch search'")
    s.set_defaults(func=run, index_command=None, index_parser=s)
    isub = s.add_subparsers(dest="index_command", metavar="ACTION")

    b = isub.add_parser("build", help="encode a gallery (images or captions) into an index directory")
    b.add_argument("--model", required=True, help="model directory or released .pth.tar")
    b.add_argument(
        "--features",
        help="precomp dataset folder, an .npy of region features (N, R, D), or (captions) a .txt",
    )
    b.add_argument(
        "--split-file",
        help="a Karpathy-split .json or an image<TAB>caption .tsv naming the images under --images "
        "(models that take pixels) and their captions (--kind caption); {split} in the name is replaced",
    )
    b.add_argument("--split", default="test", help="split of the dataset folder or split file (default: test)")
    b.add_argument(
        "--kind",
        choices=("image", "caption"),
        default="image",
        help="image index (text -> image search, default) or caption index (image -> text)",
    )
    b.add_argument(
        "--images",
        help="folder of the image files, to record their paths; for a model that takes "
        "pixels (ESL-CLIP), the folder of photos to index (then no --features; unreadable "
        "files are skipped and named), or the folder of --split-file's images",
    )
    b.add_argument("--out", help="index directory to write (replaced atomically if an index)")
    milvus_args(b, "build")
    b.add_argument(
        "--overwrite", action="store_true", help="with --milvus: replace a collection holding another gallery"
    )
    b.add_argument("--milvus-shards", type=int, help="with --milvus: shards of the new collections")
    b.add_argument("--milvus-replicas", type=int, help="with --milvus: in-memory replicas to load them with")
    b.add_argument(
        "--fp16",
        action="store_true",
        help="store the per-region tensors in float16 (half the disk; two-stage indexes only)",
    )
    b.add_argument(
        "--side-dtype",
        choices=("float32", "float16", "int8"),
        help="how an image index stores its per-region tensors: float32, float16 (= --fp16; the default of "
        "sharded indexes) or int8 with a scale per region (sharded only; see docs/retrieval.md)",
    )
    b.add_argument(
        "--shard-rows",
        type=int,
        help="images per shard (a sharded index is resumable and grows by shards; default 65536 for galleries "
        "larger than that, else one file per array; 0: never shard)",
    )
    _faiss_args(b, "flat")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (under torchrun, cuda: each process cuda:LOCAL_RANK)"
    )
    b.add_argument(
        "--text-model",
        help="tokenizer for released checkpoints (recorded for searches)",
    )
    b.add_argument(
        "--dist-timeout",
        type=float,
        default=60.0,
        help="under torchrun: longest wait in minutes for the other processes (rank 0 builds the FAISS "
        "index while they wait; default 60)",
    )

    a = isub.add_parser("add", help="append images or captions to an index (atomic)")
    a.add_argument("--index", help="index directory")
    milvus_args(a, "extend")
    a.add_argument("--model", help="model (default: the one recorded in the index)")
    a.add_argument("--features", help="as for 'index build'")
    a.add_argument("--split-file", help="as for 'index build'")
    a.add_argument("--split", default="test")
    a.add_argument(
        "--images",
        help="folder of the new image files (for a model that takes pixels: the photos to add, "
        "or the folder of --split-file's images)",
    )
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--device", default="cpu")
    a.add_argument("--text-model", help="tokenizer for released checkpoints")

    i = isub.add_parser("info", help="describe an index (and check it)")
    i.add_argument("index", nargs="?", help="index directory")
    milvus_args(i, "describe")
    i.add_argument(
        "--verify",
        action="store_true",
        help="also check every file's sha256 (reads everything)",
    )
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    r = isub.add_parser(
        "reindex",
        help="rebuild only the FAISS index (e.g. flat -> hnsw), no re-encoding",
    )
    r.add_argument("index", help="index directory")
    _faiss_args(r, None)
    r.add_argument("--out", help="write a new index here instead of replacing INDEX")


def _options(args: argparse.Namespace) -> Any:
    return FaissOptions(
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )


def load_index_model(model: str | None, manifest: dict[str, Any], device: str, text_model: str | None) -> Any:
    """The model given, else the one recorded in the index's manifest."""
    path = model or manifest["model"].get("path")
    if not path:
        raise EslmatchError("the index records no model path: pass --model")
    if model is None and not Path(path).exists():
        raise EslmatchError(f"the index's model {path} no longer exists: pass --model")
    return load_model(
        path,
        map_location=device,
        text_model=text_model or manifest["model"].get("text_model"),
    )


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "index_command", None)
    if action is None:
        args.index_parser.print_help()
        return 2
    return {"build": _build, "add": _add, "info": _info, "reindex": _reindex}[action](args)


def _inputs(args: argparse.Namespace, model: Any, kind: str) -> tuple[Any, Any]:
    """``(what to index, images_dir)`` from ``--features`` / ``--split-file`` / ``--images``."""
    split_file = args.split_file
    if split_file and args.features:
        raise EslmatchError("give --features or --split-file, not both")
    if kind == "image" and takes_pixels(model):
        if args.features:
            raise EslmatchError(
                "this model takes images, not region features: give the folder of photos with --images "
                "(or a split: --split-file FILE --images FOLDER)"
            )
        if not args.images:
            raise EslmatchError("this model takes images: give the folder of photos with --images")
        return (split_file, args.images) if split_file else (args.images, None)
    if split_file:
        if kind == "image":
            raise EslmatchError(
                "--split-file names raw images, for models that take pixels; this model reads region features: "
                "give --features"
            )
        if not args.images:
            raise EslmatchError("--split-file needs --images, the folder of its images")
        return split_file, args.images
    if kind == "image":
        if not args.features:
            raise EslmatchError("give the region features with --features (a precomp folder or an .npy)")
        return args.features, args.images
    if args.images:
        raise EslmatchError(
            "--images applies to image indexes, or to captions from --split-file (caption paths come from the dataset)"
        )
    if not args.features:
        raise EslmatchError(
            "give the captions with --features (a precomp folder or a .txt, one caption a line) or --split-file"
        )
    return args.features, None


def _build(args: argparse.Namespace) -> int:
    job = ExtractJob.join(timeout_minutes=args.dist_timeout)  # alone without torchrun
    try:
        return _build_ranks(args, job) if job.distributed else _build_alone(args)
    except JobFailed as exc:
        if exc.reported and not args.debug:
            return 1  # rank 0 printed the one error line; every rank exits non-zero
        raise
    finally:
        job.close()


def _build_ranks(args: argparse.Namespace, job: ExtractJob) -> int:
    """``index build`` under torchrun: a sharded image index, each rank encoding its shards."""
    report = _warn if job.is_main else _quiet
    with job.stage("setup", report):
        if args.milvus is not None or args.collection is not None:
            raise EslmatchError(
                "under torchrun, index build writes sharded index folders (--out), not Milvus collections: "
                "build those in one process (without torchrun)"
            )
        need_collection(args, "out")
        if args.kind != "image":
            raise EslmatchError(
                "under torchrun, index build writes sharded image indexes only: build caption indexes in one process"
            )
        model = load_model(args.model, map_location=job.device(args.device), text_model=args.text_model)
        features, images_dir = _inputs(args, model, "image")
    start = time.perf_counter()
    out = _image_index(args, model, features, images_dir, report=report, job=job)
    if not job.is_main:
        return 0  # rank 0 wrote the index and reports
    print(f"built image index {out} in {time.perf_counter() - start:.1f} s ({job.world} processes)")
    return _info(argparse.Namespace(index=str(out), verify=False, json=False))


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


def _image_index(args: argparse.Namespace, model: Any, features: Any, images_dir: Any, **more: Any) -> Path:
    return build_image_index(
        model,
        features,
        args.out,
        images_dir=images_dir,
        side_dtype=args.side_dtype,
        shard_rows=args.shard_rows,
        **_common(args),
        **more,
    )


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of every image or caption index build (not in Milvus)."""
    return dict(
        split=args.split,
        fp16=args.fp16,
        faiss_kind=args.faiss,
        faiss_options=_options(args),
        batch_size=args.batch_size,
        model_path=args.model,
        text_model=args.text_model,
    )


def _build_alone(args: argparse.Namespace) -> int:
    milvus = need_collection(args, "out")
    if milvus and args.kind != "image":
        raise EslmatchError("--milvus holds image galleries (text -> image search); build caption indexes with --out")
    device = resolve_device(args.device)
    model = load_model(args.model, map_location=device, text_model=args.text_model)
    features, images_dir = _inputs(args, model, args.kind)
    if milvus:
        from ..retrieval.milvus import build_milvus_image_index

        start = time.perf_counter()
        rep = build_milvus_image_index(
            model,
            features,
            args.milvus,
            args.collection,
            split=args.split,
            images_dir=images_dir,
            fp16=args.fp16,
            index_kind=args.faiss,
            index_options=_options(args),
            batch_size=args.batch_size,
            model_path=args.model,
            text_model=args.text_model,
            overwrite=args.overwrite,
            shards=args.milvus_shards,
            replicas=args.milvus_replicas,
            timeout=args.milvus_timeout,
        )
        _print_milvus(rep, "built", time.perf_counter() - start)
        return 0
    if args.fp16 and is_one_stage(model):
        print(
            "eslmatch: note: --fp16 has no effect on a one-stage index (it stores float32 vectors only)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    if args.kind == "image":
        out = _image_index(args, model, features, images_dir)
    else:
        out = build_caption_index(model, features, args.out, images_dir=images_dir, **_common(args))
    print(f"built {args.kind} index {out} in {time.perf_counter() - start:.1f} s")
    return _info(argparse.Namespace(index=str(out), verify=False, json=False))


def _print_milvus(rep: Any, verb: str, seconds: float) -> None:
    if rep.up_to_date:
        print(f"collection {rep.collection} already holds this gallery ({rep.count} items): nothing to do")
        return
    resumed = f", resumed: {rep.present} were stored already" if rep.present else ""
    print(
        f"{verb} collection {rep.collection}: wrote {rep.written} items{resumed} ({rep.count} in all, {seconds:.1f} s)"
    )


def _add(args: argparse.Namespace) -> int:
    if need_collection(args, "index"):
        from ..retrieval.milvus import add_to_milvus_index, describe_collection

        recorded = describe_collection(args.milvus, args.collection, args.milvus_timeout)
        model = load_index_model(args.model, recorded, str(resolve_device(args.device)), args.text_model)
        features, images_dir = _inputs(args, model, "image")
        start = time.perf_counter()
        rep = add_to_milvus_index(
            args.milvus,
            args.collection,
            model,
            features,
            split=args.split,
            images_dir=images_dir,
            batch_size=args.batch_size,
            timeout=args.milvus_timeout,
        )
        _print_milvus(rep, "extended", time.perf_counter() - start)
        return 0
    manifest = read_manifest(Path(args.index))
    model = load_index_model(args.model, manifest, str(resolve_device(args.device)), args.text_model)
    features, images_dir = _inputs(args, model, manifest["kind"])
    before = manifest["count"]
    add_to_index(
        args.index,
        model,
        features,
        split=args.split,
        images_dir=images_dir,
        batch_size=args.batch_size,
    )
    after = read_manifest(Path(args.index))["count"]
    print(f"added {after - before} items to {args.index} ({after} in all)")
    return 0


def _info(args: argparse.Namespace) -> int:
    if getattr(args, "milvus", None) is not None:
        from ..retrieval.milvus import describe_collection

        if not args.collection or args.index:
            raise EslmatchError("give INDEX or --milvus URI --collection NAME")
        m = describe_collection(args.milvus, args.collection, args.milvus_timeout)
        if args.json:
            print(json.dumps(m, indent=2, sort_keys=True))
            return 0
        print(f"collection {args.collection} at {args.milvus} ({m['state']})")
        print(f"kind       {m['kind']} ({m['count']} items, stages {m['stages']}, Dt={m['total_dim']}, {m['dtype']})")
        print(f"first      Milvus {m['index']['milvus']} (inner product)")
        print(f"model      {m['model'].get('path') or '(not recorded)'} fingerprint {m['model']['fingerprint'][:16]}")
        return 0
    if not args.index:
        raise EslmatchError("give the index directory (or --milvus URI --collection NAME)")
    index = GalleryIndex.open(args.index, verify=args.verify)
    m = index.manifest
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    size = sum(rec["bytes"] for rec in m["files"].values())
    size += sum(rec["bytes"] for shard in m.get("shards", []) for rec in shard["files"].values())
    what = "regions" if index.kind == "image" else "words"
    print(f"index      {index.path}")
    if index.one_stage:
        print(f"kind       {index.kind} ({index.count} items, one vector of {index.total_dim} each, {index.dtype})")
        print("stages     1 (exact: the inner product of the vectors is the model's score; no re-rank)")
    else:
        print(
            f"kind       {index.kind} ({index.count} items, up to {index.width} {what}, Dt={index.total_dim}, "
            f"{index.dtype})"
        )
        print("stages     2 (FAISS shortlist, then the full ESL score re-ranks it)")
    faiss = m["faiss"]
    opts = index.faiss_options.relevant(index.faiss_kind)
    print(f"faiss      {faiss['kind']}" + "".join(f" {k}={v}" for k, v in opts.items()))
    print(f"model      {m['model'].get('path') or '(not recorded)'} fingerprint {index.fingerprint[:16]}")
    print(f"grid       {'x'.join(map(str, index.grid)) if index.grid else 'none'}")
    print(f"size       {size / 2**20:.1f} MiB")
    if m.get("shards"):
        print(f"shards     {len(m['shards'])} (up to {m.get('shard_rows')} items each, format version 3)")
    for src in m.get("sources", []):
        split = f" split {src['split']}" if src.get("split") else ""
        where = src.get("features") or src.get("images") or src.get("split_file")
        skipped = f", {src['skipped']} unreadable files skipped" if src.get("skipped") else ""
        print(f"source     {where}{split} ({src.get('count')} items{skipped})")
    if args.verify:
        print("verified   every file's sha256 matches the manifest")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    if args.faiss is None:
        raise EslmatchError("choose the new first-stage index with --faiss flat|ivf|hnsw")
    out = rebuild_faiss(args.index, args.faiss, _options(args), args.out)
    print(f"rebuilt the {args.faiss} FAISS index of {out}")
    return 0
