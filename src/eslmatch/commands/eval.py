"""``eslmatch eval``: recall metrics of one model, an ensemble, or saved score matrices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..data import open_split
from ..data.raw import open_image_split
from ..errors import EslmatchError
from ..evaluate import (
    check_protocol_size,
    check_score_matrix,
    ensemble,
    evaluate_protocol,
    format_metrics,
    get_protocol,
    score_image_split,
    score_split,
)
from ..factory import load_model
from ..scoring import ScoringOptions
from ..truth import check_truth, evaluate_truth, format_truth_metrics, load_truth
from ..utils import atomic_save_npy, resolve_device

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "eval",
        help="evaluate retrieval (R@K, rsum) on a precomp split or saved score matrices",
        description="Encode a precomp split with one or more models (an ensemble averages their "
        "score matrices), or read saved (N x 5N) score matrices, and report R@1/5/10, medr, "
        "meanr and rsum under the f30k, coco1k or coco5k protocol.",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        action="append",
        metavar="MODEL",
        help="model directory or released .pth.tar (repeat for an ensemble)",
    )
    src.add_argument(
        "--scores", action="append", metavar="FILE.npy", help="saved (N x 5N) score matrix (repeat for an ensemble)"
    )
    s.add_argument(
        "--data",
        help="precomp folder or its parent (needed with --checkpoint); for models that take "
        "pixels (ESL-CLIP): a Karpathy-split JSON or a captions TSV ({split} in the name is replaced)",
    )
    s.add_argument("--image-root", help="folder of the raw images (models that take pixels, e.g. ESL-CLIP)")
    s.add_argument("--data-name", help="dataset folder under --data when it holds several (e.g. coco_precomp)")
    s.add_argument("--protocol", required=True, choices=["f30k", "coco1k", "coco5k"])
    s.add_argument("--split", help="split to evaluate (default: test for f30k, testall for coco1k/coco5k)")
    s.add_argument("--fold-size", type=int, default=1000, help="images per coco1k fold (default 1000)")
    s.add_argument("--captions-per-image", type=int, default=5, help="for --scores (default 5)")
    s.add_argument("--text-model", help="tokenizer directory or name (released checkpoints store none)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument(
        "--truth",
        metavar="FILE.json",
        help="also report truth-based P@K/R@K from a {split}_truth.json file listing, for every "
        "caption, the images it is true of (coco1k: per fold, truth restricted to the fold)",
    )
    s.add_argument("--save-scores", metavar="FILE.npy", help="write the (ensemble) score matrix, float32")
    s.add_argument("--batch-size", type=int, default=128, help="encoding batch size (default 128)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    s.add_argument("--budget-mb", type=float, help="memory budget of the scoring engine, MiB")
    s.add_argument("--full-check", action="store_true", help="scan every image row for NaN/inf")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=run)


def _load_scores(path: str):
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise EslmatchError(f"{p}: no such score file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise EslmatchError(
            f"{p}: not a plain .npy score matrix (pickled or corrupt files are not loaded): {exc}"
        ) from exc
    if not isinstance(arr, np.ndarray):
        raise EslmatchError(f"{p}: holds several arrays; give a single (N x 5N) .npy matrix")
    return arr


def run(args: argparse.Namespace) -> int:
    protocol = get_protocol(args.protocol)
    save = Path(args.save_scores) if args.save_scores else None
    if save is not None and save.is_dir():
        raise EslmatchError(f"--save-scores {save}: is a directory")
    if args.batch_size < 1:
        raise EslmatchError(f"--batch-size must be >= 1, got {args.batch_size}")
    meta: dict = {}
    truth = None
    if args.truth:  # format errors before any encoding; counts are checked against the scores below
        truth = load_truth(args.truth, None, None)
    if args.scores:
        cpi = args.captions_per_image
        matrices = [check_score_matrix(_load_scores(p), cpi, p) for p in args.scores]
        meta["models"] = list(args.scores)
    else:
        if not args.data:
            raise EslmatchError("--data is needed with --checkpoint")
        matrices, cpi, meta = _score_with_models(args, protocol.default_split)
    for name, m in zip(meta["models"], matrices):
        if m.shape != matrices[0].shape:
            raise EslmatchError(
                f"{name}: shape {m.shape} differs from that of {meta['models'][0]}: {matrices[0].shape}"
            )
    sims = matrices[0] if len(matrices) == 1 else ensemble(matrices)
    result = evaluate_protocol(sims, protocol.name, fold_size=args.fold_size, captions_per_image=cpi)
    result.update(meta)
    if len(matrices) > 1:
        result["ensemble"] = len(matrices)
    if truth is not None:
        truth = check_truth(truth, sims.shape[0], sims.shape[1], source=args.truth)
        result["truth"] = evaluate_truth(sims, truth, protocol.name, fold_size=args.fold_size, captions_per_image=cpi)
        result["truth"]["file"] = args.truth
    if save is not None:
        atomic_save_npy(save, np.asarray(sims, dtype=np.float32))
        result["saved_scores"] = str(save)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_metrics(result))
        if truth is not None:
            print("\n" + format_truth_metrics(result["truth"]))
        if save is not None:
            print(f"saved the {sims.shape[0]} x {sims.shape[1]} score matrix to {save}")
    return 0


def _score_with_models(args: argparse.Namespace, default_split: str):
    device = resolve_device(args.device)
    split_name = args.split or default_split
    options = ScoringOptions()
    if args.budget_mb is not None:
        if args.budget_mb <= 0:
            raise EslmatchError(f"--budget-mb must be positive, got {args.budget_mb}")
        options = ScoringOptions(budget_bytes=int(args.budget_mb * (1 << 20)))
    models = []
    for path in args.checkpoint:  # load every model first: a bad one fails before any encoding
        model = load_model(path, map_location=device, text_model=args.text_model)
        if model.tokenizer is None:
            raise EslmatchError(
                f"{path}: the model stores no tokenizer (released checkpoints do not): pass --text-model "
                f"with its BERT tokenizer's directory or name"
            )
        models.append(model)
    pixel_models = [hasattr(m, "preprocess") for m in models]
    if any(pixel_models):
        if not all(pixel_models):
            raise EslmatchError("an ensemble must take one kind of input: pixels (ESL-CLIP) or region features")
        return _score_raw_images(args, models, split_name, device, options)
    if args.image_root:
        raise EslmatchError(
            f"{args.checkpoint[0]} scores region features, not images: drop --image-root and give "
            "--data a precomp folder (eslmatch extract makes one from images)"
        )
    dims = {m.config.img_dim for m in models}
    if len(dims) > 1:
        raise EslmatchError(f"the models expect different image feature widths: {sorted(dims)}")
    split = open_split(args.data, split_name, img_dim=dims.pop(), data_name=args.data_name, full_check=args.full_check)
    check_protocol_size(args.protocol, split.n_images, args.fold_size)  # before any encoding
    matrices = []
    for model in models:
        matrices.append(
            score_split(model, split, args.batch_size, device, progress=not args.no_progress, options=options)
        )
    meta = {"models": list(args.checkpoint), "split": split_name, "data": str(split.root)}
    return matrices, split.captions_per_image, meta


def _score_raw_images(args: argparse.Namespace, models: list, split_name: str, device, options):
    """Score models that take pixels on a raw-image split (images and captions encoded once)."""
    if not args.image_root:
        raise EslmatchError(
            "this model takes images: pass --image-root (the folder of the images) with --data "
            "(a Karpathy-split JSON or a captions TSV)"
        )
    split = open_image_split(args.data, args.image_root, split_name, args.captions_per_image)
    split.require_complete()
    check_protocol_size(args.protocol, split.n_images, args.fold_size)
    matrices = [score_image_split(m, split, args.batch_size, device, options=options) for m in models]
    meta = {"models": list(args.checkpoint), "split": split_name, "data": str(split.source)}
    return matrices, split.captions_per_image, meta
