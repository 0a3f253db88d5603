"""What the gallery commands (``index``, ``search``, ``serve``) share: the arguments naming a
gallery and its query encoding, checked before anything heavy is imported, and the gallery
they open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from ..utils.choices import PRECISIONS, RUNTIMES
from ..utils.io import replace_journal

if TYPE_CHECKING:
    from ..retrieval import Gallery


def gallery_args(p: argparse.ArgumentParser, what: str, positional: bool = False, place: str = "index") -> None:
    """``--index DIR`` (``--{place}``) or ``--milvus URI --collection NAME`` (and ``--milvus-timeout``)."""
    if positional:
        p.add_argument("index_pos", nargs="?", metavar="INDEX", help="gallery folder (or use --index / --milvus)")
    p.add_argument(f"--{place}", help=f"the gallery folder to {what} (one of --{place} / --milvus)")
    p.add_argument(
        "--milvus",
        metavar="URI",
        help=f"{what.split(' (')[0]} a gallery in Milvus at URI, e.g. http://127.0.0.1:19530 (instead of --{place})",
    )
    p.add_argument("--collection", help="the Milvus collection (required with --milvus)")
    p.add_argument(
        "--milvus-timeout",
        type=float,
        default=30.0,
        help="seconds a Milvus call may take, retries included (default 30)",
    )


def gallery_target(args: argparse.Namespace, place: str = "index") -> tuple[str, str | None]:
    """``(folder or URI, collection or None)``; refuses a half-given or doubly-given place."""
    folder = getattr(args, place, None) or getattr(args, "index_pos", None)
    if args.milvus is None:
        if args.collection is not None:
            raise EslmatchError("--collection needs --milvus URI")
        if not folder:
            raise EslmatchError(f"give --{place} (a gallery folder) or --milvus URI --collection NAME")
        if place == "index":
            check_gallery_folder(Path(folder))
        return folder, None
    if not args.collection:
        raise EslmatchError("--milvus needs --collection NAME")
    if folder:
        raise EslmatchError(f"give --{place} or --milvus, not both")
    if args.milvus_timeout <= 0:
        raise EslmatchError(f"--milvus-timeout must be positive, got {args.milvus_timeout}")
    return args.milvus, args.collection


def check_gallery_folder(path: Path) -> None:
    """Refuse a gallery folder that is not there, before anything heavy is imported (the same
    words as :func:`eslmatch.retrieval.layout.read_manifest`; a folder whose replacement a
    crash left half done is left to the gallery to recover)."""
    if replace_journal(path).exists():
        return
    if not path.exists():
        raise EslmatchError(f"{path}: no such index directory")
    if not path.is_dir():
        raise EslmatchError(f"{path}: an index is a directory (built by 'eslmatch index build')")
    if not (path / "manifest.json").is_file():
        raise EslmatchError(f"{path / 'manifest.json'}: missing (not an eslmatch gallery index, or a damaged one)")


def encoding_args(p: argparse.ArgumentParser, what: str, default: str | None) -> None:
    """``--precision``, ``--runtime`` and ``--onnx``: how ``what`` is encoded."""
    said = f"default {default}" if default else "default: the precision the gallery records, fp32 if none"
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=f"precision of the encoders for {what}: fp32, bf16 (autocast) or auto = bf16 where the device "
        f"computes it natively ({said}); scores keep the engine's precision",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help=f"run the encoders for {what} in torch (default) or onnxruntime: the model's ONNX export "
        "(eslmatch export MODEL --format onnx --out MODEL/onnx, or --onnx DIR; pip install 'eslmatch[onnx]')",
    )
    p.add_argument("--onnx", metavar="DIR", help="the ONNX export for --runtime onnxruntime (default MODEL/onnx)")


def check_encoding_args(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, what ``--runtime`` / ``--onnx`` cannot do here."""
    runtime = getattr(args, "runtime", "torch")
    onnx = getattr(args, "onnx", None)
    if runtime != "onnxruntime":
        if onnx is not None:
            raise EslmatchError("--onnx applies to --runtime onnxruntime")
        return
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise EslmatchError("--runtime onnxruntime needs onnxruntime: pip install 'eslmatch[onnx]'")
    if getattr(args, "precision", None) == "bf16":
        raise EslmatchError("--precision bf16 applies to --runtime torch; ONNX Runtime runs the exported fp32 graphs")
    if onnx is not None and not (Path(onnx) / "encoders.json").is_file():
        raise EslmatchError(f"{onnx}: not an eslmatch ONNX export (no encoders.json; see eslmatch export)")


def open_from_args(args: argparse.Namespace, verify: bool = False) -> Gallery:
    """The gallery the arguments name (its model is loaded on first use)."""
    from ..retrieval import open_gallery

    target, collection = gallery_target(args)
    device = getattr(args, "device", "cpu")
    if device != "cpu":  # "cpu" needs no torch to say so
        from ..utils import resolve_device

        device = str(resolve_device(device))
    return open_gallery(
        target,
        collection,
        model=getattr(args, "model", None),
        text_model=getattr(args, "text_model", None),
        device=device,
        verify=verify,
        timeout=args.milvus_timeout,
        precision=getattr(args, "precision", None),
        runtime=getattr(args, "runtime", "torch"),
        onnx=getattr(args, "onnx", None),
    )
