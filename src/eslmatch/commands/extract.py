"""``eslmatch extract --images DIR --out DATASET_DIR``: region features from raw images.

Runs unchanged under ``torchrun`` (``torchrun --nproc_per_node=N -m eslmatch.cli extract ...``):
the processes share the chunks and rank 0 writes the same files as one process would.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..utils.choices import MEASURED_RUNTIMES, PRECISIONS

ORDER = 10
_SHOW = 50  # skipped files printed; all are in extract_meta.json


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "extract",
        help="extract region features from a folder of images into a precomp dataset",
        description="Write {split}_ims.npy (N, R, D), {split}_ids.txt, {split}_images.txt, "
        "{split}_caps.txt (with --captions) and extract_meta.json into --out. Unreadable files "
        "are skipped and listed; an interrupted run resumes from its finished chunks.",
    )
    s.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    s.add_argument("--out", required=True, metavar="DATASET_DIR", help="dataset folder to write")
    s.add_argument(
        "--captions",
        metavar="FILE",
        help="image_name<TAB>caption lines, several per image allowed (default: none, features only)",
    )
    s.add_argument(
        "--captions-per-image",
        type=int,
        default=5,
        metavar="K",
        help="captions kept per image: the first K, fewer repeated cyclically (default 5)",
    )
    s.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        help="efficientnet-lite0 (default, offline ImageNet weights), resnet152 (needs "
        "torchvision and --weights), efficientnet-lite0-boxes (needs --boxes)",
    )
    s.add_argument("--split", default="test", help="split name of the written files (default test)")
    s.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per backbone call (default 16)",
    )
    s.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default auto)")
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="backbone precision: fp32 (float32), bf16 (bf16 autocast, channels-last), auto = bf16 where the "
        "device computes it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32 (default auto)",
    )
    s.add_argument(
        "--runtime",
        choices=MEASURED_RUNTIMES,
        default="auto",
        help="what runs the backbone on CPU: auto = ONNX Runtime where it is faster and agrees with float32 "
        "eager (measured once per machine, cached), torch, onnxruntime (default auto)",
    )
    s.add_argument(
        "--weights",
        metavar="PATH",
        help="backbone state dict (default: the backbone's packaged weights; required for resnet152)",
    )
    s.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help="images are resized to SxS (default 224 for EfficientNet: 7x7=49 regions; 512 for resnet152)",
    )
    s.add_argument("--chunk", type=int, default=256, help="files per resumable chunk (default 256)")
    s.add_argument(
        "--boxes",
        metavar="FILE.json",
        help="{image_name: [[x1, y1, x2, y2], ...]} for box pooling (default: none, grid regions)",
    )
    s.add_argument(
        "--max-boxes",
        type=int,
        metavar="R",
        help="regions per image with --boxes (default: most boxes of any image)",
    )
    s.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read sub-folders too, as index build and embed do (default; ids keep the sub-folder); "
        "--no-recursive: the top folder only, each sub-folder listed as not read",
    )
    s.add_argument(
        "--relative-paths",
        action="store_true",
        help="write {split}_images.txt relative to --out (default absolute paths)",
    )
    s.add_argument("--workers", type=int, default=2, help="threads reading images (default 2)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--dist-timeout",
        type=float,
        default=60.0,
        metavar="MINUTES",
        help="under torchrun: longest wait for the other processes (default 60)",
    )
    s.set_defaults(func=run)


# extract_folder's keyword arguments that are options of the same name
_SAME = "captions split captions_per_image batch_size device weights image_size chunk boxes max_boxes recursive".split()
_SAME += "relative_paths workers precision runtime".split()


def _extract(args: argparse.Namespace) -> dict[str, Any]:
    from ..extract import extract_folder

    same = {k: getattr(args, k) for k in _SAME}
    return extract_folder(
        args.images,
        args.out,
        backbone=args.backbone,
        progress=not args.no_progress,
        dist_timeout_minutes=args.dist_timeout,
        **same,
    )


def run(args: argparse.Namespace) -> int:
    summary = _extract(args)
    if "shape" not in summary:
        return 0  # a torchrun rank other than 0: rank 0 wrote the files and reports
    n, r, d = summary["shape"]
    speed = summary["images_per_second"]
    rate = f", {speed:.1f} images/s" if speed else ""
    if summary.get("processes", 1) > 1:
        rate += f" ({summary['processes']} processes)"
    print(
        f"extracted {n} images -> {summary['files']['images']} ({n}, {r}, {d}) with {summary['backbone']} "
        f"at {summary['image_size']}x{summary['image_size']} on {summary['device']} in {summary['precision']}"
        f"{' (onnxruntime)' if summary.get('runtime') == 'onnxruntime' else ''}{rate}"
    )
    if summary["reused_chunks"]:
        print(f"resumed: {summary['reused_chunks']} chunks reused, {summary['computed_images']} files processed now")
    if "captions" in summary["files"]:
        print(
            f"captions: {summary['n_captions']} ({summary['captions_per_image']} per image) -> {summary['files']['captions']}"
        )
    else:
        print("captions: none (no --captions file): features only")
    skipped = summary["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} files:")
        for item in skipped[:_SHOW]:
            print(f"  {item['file']}: {item['reason']}")
        if len(skipped) > _SHOW:
            print(f"  ... and {len(skipped) - _SHOW} more (see extract_meta.json)")
    return 0
