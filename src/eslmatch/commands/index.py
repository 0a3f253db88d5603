"""``eslmatch index build|add|delete|update|compact|info|reindex``: galleries (a folder, or a
Milvus collection with ``--milvus URI --collection NAME``), the same operations on both.

``index build`` of a file gallery also runs under ``torchrun`` (every process encodes its share
of the shards, rank 0 writes the rest; see docs/retrieval.md). Arguments, files and filters
are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import EslmatchError, counted
from ..retrieval.policy import ON_DUPLICATE
from ..utils.choices import PRECISIONS, RUNTIMES
from ..utils.messages import note
from ._gallery import check_encoding_args, encoding_args, gallery_args, gallery_target, open_from_args

log = logging.getLogger(__name__)

ORDER = 60
KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")


def _inputs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        help="region features: a precomp dataset folder or an .npy (N, R, D); captions (--kind caption): a .txt, "
        "one caption a line, or a precomp folder (one of --features / --images / --split-file)",
    )
    p.add_argument(
        "--images",
        action="append",
        help="a folder of photos (sub-folders read, unreadable files skipped and named; repeat for several: each is "
        "a root that index sync rescans; a model of region features makes them with the gallery's extractor, "
        "EfficientNet-Lite0 by default), the folder of --split-file's images, or the folder of --features' image "
        "files to record their paths (default: no paths recorded)",
    )
    p.add_argument(
        "--split-file",
        help="a Karpathy-split .json or an image<TAB>caption .tsv naming the images under --images; {split} in the "
        "name is replaced (default: none; one of --features / --images / --split-file)",
    )
    p.add_argument("--split", default="test", help="split of the dataset folder or split file (default: test)")
    p.add_argument(
        "--metadata",
        metavar="META",
        help='metadata of the items: JSON Lines ({"id": ..., "field": value}) or CSV with an id column (default: none)',
    )
    _device_args(p)
    p.add_argument(
        "--text-model", help="tokenizer of a released checkpoint, recorded for searches (default: the model's own)"
    )


def _encode_args(p: argparse.ArgumentParser) -> None:
    """What an action that may encode photos takes (the model is loaded only if it does)."""
    p.add_argument("--model", help="model (default: the one the gallery records)")
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256, help="items encoded at once (default 256)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or auto")


def _faiss_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--faiss",
        choices=KINDS,
        default=default,
        help="first stage: auto (default: flat, exact, up to 100,000 items; ivfpq above; re-chosen as the gallery "
        "grows), flat, ivf, hnsw or ivfpq (IVF + product codes re-scored exactly; see docs/retrieval.md); "
        "with --milvus: flat, ivf or hnsw",
    )
    p.add_argument("--nlist", type=int, help="IVF clusters (default: sqrt(N); ivfpq: 4 sqrt(N) to a power of two)")
    p.add_argument(
        "--nprobe", type=int, help="IVF clusters searched per query (default: max(16, nlist/4); ivfpq: 8 sqrt(nlist))"
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree (default 32)")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam width (default 80)")
    p.add_argument("--ef-search", type=int, default=256, help="HNSW search beam width (default 256)")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("index", help="build a gallery and change it: add, delete, update, compact; describe it")
    s.set_defaults(func=run, index_command=None, index_parser=s)
    isub = s.add_subparsers(dest="index_command", metavar="ACTION")

    b = isub.add_parser("build", help="encode a gallery (images or captions) into a folder or a Milvus collection")
    b.add_argument("--model", required=True, help="model directory or released checkpoint")
    _inputs_args(b)
    b.add_argument(
        "--kind",
        choices=("image", "caption"),
        default="image",
        help="image gallery (text -> image search, default) or caption index (image -> text)",
    )
    gallery_args(b, "build (an existing one is replaced atomically)", place="out")
    b.add_argument(
        "--overwrite", action="store_true", help="with --milvus: replace a collection holding another gallery"
    )
    b.add_argument("--milvus-shards", type=int, help="with --milvus: shards of the new collections (Milvus's default)")
    b.add_argument(
        "--milvus-replicas", type=int, help="with --milvus: in-memory replicas to load them with (default: Milvus's)"
    )
    b.add_argument(
        "--fp16", action="store_true", help="store the per-region tensors in float16 (= --side-dtype float16)"
    )
    b.add_argument(
        "--side-dtype",
        choices=("float32", "float16", "int8"),
        help="how a two-stage gallery stores its per-region tensors (default float32 up to 65,536 items, float16 above; "
        "int8: a scale per region vector, a quarter of float32)",
    )
    b.add_argument(
        "--shard-rows", type=int, help="items per shard (default 65536; shards are written and resumed whole)"
    )
    _faiss_args(b, "auto")
    encoding_args(b, "the gallery's items", "fp32")
    b.add_argument(
        "--dist-timeout",
        type=float,
        default=60.0,
        help="under torchrun: longest wait in minutes for the other processes (default 60)",
    )

    a = isub.add_parser("add", help="add images or captions to a gallery (atomic; ids already stored are skipped)")
    gallery_args(a, "extend")
    a.add_argument("--model", help="model (default: the one the gallery records)")
    _inputs_args(a)
    a.add_argument(
        "--on-duplicate",
        choices=ON_DUPLICATE,
        default="skip",
        help="an id the gallery holds already: skip the new item (default), replace the stored one, or stop",
    )
    encoding_args(a, "the new items", None)

    y = isub.add_parser(
        "sync", help="rescan the gallery's folders of photos: add new files, re-encode changed ones, follow moves"
    )
    gallery_args(y, "bring up to date")
    y.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    y.add_argument("--json", action="store_true", help="print the counts as JSON")
    _encode_args(y)

    t = isub.add_parser("restore", help="bring back deleted photos whose files are still in a root (sync skips them)")
    gallery_args(t, "change")
    t.add_argument("--ids", nargs="+", metavar="ID", required=True, help="ids of the excluded items to restore")
    _encode_args(t)

    d = isub.add_parser("delete", help="delete items by id or by filter (atomic; sync leaves deleted photos out)")
    gallery_args(d, "change")
    who = d.add_mutually_exclusive_group(required=True)
    who.add_argument("--ids", nargs="+", metavar="ID", help="ids of the items to delete (one of --ids / --where)")
    who.add_argument(
        "--where",
        metavar="EXPR",
        help='a filter, e.g. \'folder == "trips" and taken < "2020"\' (one of --ids / --where)',
    )

    u = isub.add_parser("update", help="set metadata of items (atomic)")
    gallery_args(u, "change")
    u.add_argument(
        "--metadata", metavar="META", required=True, help="JSON Lines or CSV with an id column (null clears)"
    )

    c = isub.add_parser("compact", help="reclaim the space of deleted items and merge small shards (atomic)")
    gallery_args(c, "compact")

    i = isub.add_parser("info", help="describe a gallery (and check it)")
    gallery_args(i, "describe", positional=True)
    i.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads everything)")
    i.add_argument("--json", action="store_true", help="print the manifest, counts and layout as JSON")
    i.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the precision queries will be encoded in (default: the gallery's): a mismatch is stated",
    )
    i.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="the runtime queries will be encoded in (default torch): a mismatch is stated",
    )

    r = isub.add_parser("reindex", help="rebuild only the first stage (e.g. flat -> hnsw), no re-encoding")
    r.add_argument("index_pos", nargs="?", metavar="INDEX", help="gallery folder (or use --index)")
    r.add_argument("--index", help="the gallery folder to change (one of --index / INDEX)")
    _faiss_args(r, None)
    r.add_argument("--out", help="write a new gallery here (default: INDEX is changed in place, atomically)")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "index_command", None)
    if action is None:
        args.index_parser.print_help()
        return 2
    handlers = dict(build=_build, add=_add, delete=_delete, update=_update, compact=_compact, info=_info)
    handlers.update(sync=_sync, restore=_restore, reindex=_reindex)
    return handlers[action](args)


def _options(args: argparse.Namespace) -> Any:
    from ..retrieval import BuildOptions

    if args.fp16 and args.side_dtype not in (None, "float16"):
        raise EslmatchError(f"--fp16 contradicts --side-dtype {args.side_dtype}")
    opts = BuildOptions(
        faiss_kind=args.faiss,
        faiss=_faiss_options(args),
        side_dtype="float16" if args.fp16 else args.side_dtype,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        precision=args.precision,
        runtime=args.runtime,
        onnx=args.onnx,
    )
    opts.check()
    return opts


def _faiss_options(args: argparse.Namespace) -> Any:
    from ..retrieval import FaissOptions

    names = ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")
    return FaissOptions(**{n: getattr(args, n) for n in names})


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be refused before a model is loaded."""
    if args.features and args.split_file:
        raise EslmatchError("give --features or --split-file, not both")
    if not (args.features or args.images or args.split_file):
        raise EslmatchError(
            "give what to index: --features (region features or captions), --images (photos) or --split-file"
        )
    images = args.images or []
    if len(images) > 1 and (args.features or args.split_file):
        raise EslmatchError("give one --images with --features or --split-file (several are folders of photos)")
    for name in ("features", "images", "split_file", "metadata"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value and "{split}" not in value and not Path(value).exists():
                raise EslmatchError(f"{value}: no such file or folder (--{name.replace('_', '-')})")
    args.images = images[0] if len(images) == 1 else (images or None)
    if args.batch_size < 1:
        raise EslmatchError(f"--batch-size must be a positive integer, got {args.batch_size}")
    check_encoding_args(args)


def _inputs(args: argparse.Namespace, model: Any, kind: str) -> tuple[Any, dict[str, Any]]:
    """``(what to index, source options)`` from ``--features`` / ``--images`` / ``--split-file``."""
    pixels = model.inputs == "pixels"
    if kind == "image" and pixels:
        if args.features:
            raise EslmatchError(
                "this model takes images, not region features: give the folder of photos with --images "
                "(or a split: --split-file FILE --images FOLDER)"
            )
        if not args.images:
            raise EslmatchError("this model takes images: give the folder of photos with --images")
        if args.split_file:
            return args.split_file, {"split": args.split, "images_dir": args.images}
        return args.images, {"split": args.split}
    if args.split_file:
        if kind == "image":
            raise EslmatchError(
                "--split-file names raw images, for models that take pixels; this model reads region features: give --features"
            )
        if not args.images:
            raise EslmatchError("--split-file needs --images, the folder of its images")
        return args.split_file, {"split": args.split, "images_dir": args.images, "kind": kind}
    if not args.features and kind == "image" and args.images:
        return args.images, {"split": args.split}  # photos: regions made by the gallery's extractor
    if not args.features:
        what = (
            "captions with --features (a .txt or a precomp folder)"
            if kind == "caption"
            else "region features with --features"
        )
        raise EslmatchError(f"give the {what} (a precomp folder or an .npy)")
    if kind == "caption" and args.images:
        raise EslmatchError("--images applies to image galleries, or to captions from --split-file")
    return args.features, {"split": args.split, "images_dir": args.images, "kind": kind}


def _read_meta(args: argparse.Namespace) -> Any:
    from ..retrieval import read_metadata

    return read_metadata(args.metadata) if args.metadata else None


def _build(args: argparse.Namespace) -> int:
    from ..distributed import DistContext

    job = DistContext.join(timeout_minutes=args.dist_timeout)  # alone without torchrun
    try:
        return _build_in(args, job)
    finally:
        job.close()


def _build_in(args: argparse.Namespace, job: Any) -> int:
    from ..factory import load_model
    from ..retrieval import build_gallery
    from ..utils import resolve_device

    with job.stage("setup"):
        milvus = args.milvus is not None or args.collection is not None
        if milvus and job.distributed:
            raise EslmatchError(
                "under torchrun, index build writes gallery folders (--out), not Milvus collections: build those in one process"
            )
        if milvus:
            gallery_target(args, "out")
            if args.kind != "image":
                raise EslmatchError(
                    "--milvus holds image galleries (text -> image search); build caption indexes with --out"
                )
        elif not args.out:
            raise EslmatchError("give --out (a gallery folder) or --milvus URI --collection NAME")
        _check_inputs(args)
        options = _options(args)
        metadata = _read_meta(args)
        device = job.device_for(args.device) if job.distributed else str(resolve_device(args.device))
        model = load_model(args.model, map_location=device, text_model=args.text_model)
        inputs, source_options = _inputs(args, model, args.kind)
        if options.side_dtype is not None and model.exact_index:
            note(log, "--fp16 / --side-dtype have no effect on a one-stage gallery (float32 vectors only)")
    options.progress = job.is_main
    start = time.perf_counter()
    target = args.milvus if milvus else args.out
    names = ("overwrite", "milvus_shards", "milvus_replicas", "milvus_timeout")  # build_milvus's, less "milvus_"
    extra = {n.removeprefix("milvus_"): getattr(args, n) for n in names} if milvus else {}
    gallery = build_gallery(
        model,
        inputs,
        target,
        args.collection if milvus else None,
        metadata=metadata,
        options=options,
        model_path=args.model,
        text_model=args.text_model,
        job=job,
        milvus=extra,
        **source_options,
    )
    if gallery is None:
        return 0  # a torchrun rank other than 0: rank 0 reports
    seconds = time.perf_counter() - start
    if milvus:
        print(gallery.store.last_write.line(seconds))  # type: ignore[attr-defined]  # a MilvusStore just built
        return 0
    procs = f" ({job.world_size} processes)" if job.distributed else ""
    print(f"built {args.kind} gallery {args.out} in {seconds:.1f} s{procs}")
    from ..retrieval.describe import format_description

    print(format_description(gallery.describe()))
    return 0


def _add(args: argparse.Namespace) -> int:
    gallery_target(args)
    _check_inputs(args)
    metadata = _read_meta(args)
    gallery = open_from_args(args)
    inputs, source_options = _inputs(args, gallery.model, gallery.kind)
    source_options.pop("kind", None)
    from ..retrieval import BuildOptions

    start = time.perf_counter()
    rep = gallery.add(
        inputs,
        metadata,
        args.on_duplicate,
        options=BuildOptions(batch_size=args.batch_size, encoding=gallery.encoding),
        **source_options,
    )
    print(rep.line(gallery.store.where, args.on_duplicate, time.perf_counter() - start))
    return 0


def _sync(args: argparse.Namespace) -> int:
    gallery_target(args)
    if args.batch_size < 1:
        raise EslmatchError(f"--batch-size must be a positive integer, got {args.batch_size}")
    gallery = open_from_args(args)
    from ..retrieval import BuildOptions

    start = time.perf_counter()
    plan = gallery.sync(dry_run=args.dry_run, options=BuildOptions(batch_size=args.batch_size))
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**plan.counts(), "dry_run": args.dry_run, "seconds": round(seconds, 3)}, sort_keys=True))
    elif args.dry_run:
        print(f"{gallery.store.where} would change: {plan.line()} (dry run: nothing changed)")
    else:
        print(f"synced {gallery.store.where}: {plan.line()} ({len(gallery)} items, {seconds:.1f} s)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    gallery_target(args)
    gallery = open_from_args(args)
    from ..retrieval import BuildOptions

    rep = gallery.restore(args.ids, options=BuildOptions(batch_size=args.batch_size))
    print(f"restored {counted(rep.added, 'item')} to {gallery.store.where} ({rep.count} in all)")
    return 0


def _delete(args: argparse.Namespace) -> int:
    gallery_target(args)
    from ..retrieval import parse_filter

    where = parse_filter(args.where) if args.where else None
    gallery = open_from_args(args)
    n = gallery.delete(ids=args.ids, where=where)
    print(f"deleted {counted(n, 'item')} from {gallery.store.where} ({len(gallery)} left)")
    return 0


def _update(args: argparse.Namespace) -> int:
    gallery_target(args)
    gallery = open_from_args(args)
    n = gallery.update(args.metadata)
    print(f"updated the metadata of {counted(n, 'item')} of {gallery.store.where}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    gallery_target(args)
    gallery = open_from_args(args)
    start = time.perf_counter()
    rep = gallery.compact()
    print(
        f"compacted {gallery.store.where}: {counted(rep['removed'], 'deleted item')} removed, {counted(rep['count'], 'item')} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    gallery_target(args)
    gallery = open_from_args(args, verify=args.verify)
    from ..retrieval.describe import format_description

    info = gallery.describe(args.precision, args.runtime)
    print(
        json.dumps(info, indent=2, sort_keys=True, default=str) if args.json else format_description(info, args.verify)
    )
    return 0


def _reindex(args: argparse.Namespace) -> int:
    if args.index and args.index_pos:
        raise EslmatchError("give the gallery once: --index INDEX")
    args.index = args.index or args.index_pos
    if not args.index:
        raise EslmatchError("give --index (a gallery folder)")
    if args.faiss is None:
        raise EslmatchError("choose the new first stage with --faiss auto|flat|ivf|hnsw|ivfpq")
    from ..retrieval import FileStore
    from ..retrieval.files.compact import copy_gallery

    opts = _faiss_options(args)  # checked before anything is copied or built
    target = args.index
    if args.out:
        copy_gallery(Path(args.index), Path(args.out))
        target = args.out
    store = FileStore.open(target)
    rec = store.reindex(args.faiss, opts)
    print(f"rebuilt the first stage of {target}: {rec.get('kind')}")
    return 0
