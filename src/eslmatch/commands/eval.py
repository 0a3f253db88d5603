"""``eslmatch eval``: recall metrics of one model, an ensemble, or saved score matrices; the
extended COCO 5K annotations (ECCV Caption, CxC); the SugarCrepe and Winoground benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from ..utils.choices import COMPOSITIONAL_PROTOCOLS, PRECISIONS, RECALL_PROTOCOLS

if TYPE_CHECKING:
    import numpy as np

    from ..scoring import ScoringOptions

ORDER = 30
COMPOSITIONAL = COMPOSITIONAL_PROTOCOLS


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "eval",
        help="evaluate retrieval (R@K, rsum; ECCV/CxC; SugarCrepe, Winoground)",
        description="Encode a precomp split with one or more models (an ensemble averages their "
        "score matrices), or read saved (N x 5N) score matrices, and report R@1/5/10, medr, "
        "meanr and rsum under the f30k, coco1k or coco5k protocol; with coco5k, --extended adds the "
        "ECCV Caption and CxC metrics. --protocol sugarcrepe / winoground score the compositional "
        "benchmarks instead (see docs/evaluation.md).",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        action="append",
        metavar="MODEL",
        help="model directory or released .pth.tar (repeat for an ensemble; this or --scores is required)",
    )
    src.add_argument(
        "--scores",
        action="append",
        metavar="FILE.npy",
        help="saved (N x 5N) score matrix (repeat for an ensemble; this or --checkpoint is required)",
    )
    s.add_argument(
        "--data",
        help="precomp folder or its parent (needed with --checkpoint); for models that take "
        "pixels (ESL-CLIP): a Karpathy-split JSON or a captions TSV ({split} in the name is replaced); "
        "sugarcrepe: the folder of its JSON files; winoground: examples.jsonl or its folder (default: none)",
    )
    s.add_argument(
        "--image-root",
        help="folder of the raw images (models that take pixels, e.g. ESL-CLIP; sugarcrepe: COCO val2017) "
        "(default: none)",
    )
    s.add_argument(
        "--data-name",
        help="dataset folder under --data when it holds several (e.g. coco_precomp; default: the only one)",
    )
    s.add_argument(
        "--protocol",
        required=True,
        choices=[*RECALL_PROTOCOLS, *COMPOSITIONAL],
        help="f30k, coco1k, coco5k (retrieval), sugarcrepe or winoground (compositional); required",
    )
    s.add_argument(
        "--split",
        help="split to evaluate (default: test for f30k, testall for coco1k/coco5k); sugarcrepe/winoground: "
        "the file prefix in --features (default test, as eslmatch extract writes)",
    )
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="precision of the encoders: fp32 (default: the published protocols' figures), bf16 (autocast) or "
        "auto = bf16 where the device computes it natively; scores keep the engine's float32",
    )
    s.add_argument("--fold-size", type=int, default=1000, help="images per coco1k fold (default 1000)")
    s.add_argument("--captions-per-image", type=int, default=5, help="for --scores (default 5)")
    s.add_argument(
        "--text-model", help="tokenizer directory or name (released checkpoints store none; default: the model's own)"
    )
    s.add_argument("--json", action="store_true", help="print the results as JSON (default: a table)")
    s.add_argument(
        "--truth",
        metavar="FILE.json",
        help="also report truth-based P@K/R@K from a {split}_truth.json file listing, for every "
        "caption, the images it is true of (coco1k: per fold, truth restricted to the fold; default: none)",
    )
    s.add_argument(
        "--save-scores", metavar="FILE.npy", help="write the (ensemble) score matrix, float32 (default: not written)"
    )
    s.add_argument("--batch-size", type=int, default=128, help="encoding batch size (default 128)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    s.add_argument("--budget-mb", type=float, help="memory budget of the scoring engine, MiB (default 1024)")
    s.add_argument(
        "--full-check", action="store_true", help="scan every image row for NaN/inf (default: a sample of 256 rows)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    ext = s.add_argument_group("extended COCO 5K annotations (--protocol coco5k)")
    ext.add_argument(
        "--extended",
        metavar="SETS",
        help="also report ECCV Caption (mAP@R, R-Precision, R@1) and/or CxC (R@1/5/10) on the COCO 5K test "
        "split, with COCO 5K R@K from the same ids: comma-separated from eccv,cxc; needs the eccv-caption "
        "package: pip install 'eslmatch[eval]' (default: none)",
    )
    ext.add_argument(
        "--image-ids",
        metavar="FILE",
        help="the COCO image id of each score row, one per line (default: from the data: the Karpathy "
        "JSON's cocoid, or {split}_ids.txt of a precomp folder)",
    )
    ext.add_argument(
        "--caption-ids",
        metavar="FILE",
        help="the COCO caption annotation id of each score column, one per line (default: each caption "
        "matched by text among its image's annotations in --coco-captions)",
    )
    ext.add_argument(
        "--coco-captions",
        action="append",
        metavar="FILE.json",
        help="COCO's captions_val2014.json / captions_train2014.json (repeat for both): annotation ids of "
        "the captions, matched by text, and image ids of file names (default: none)",
    )
    cmp = s.add_argument_group("compositional benchmarks (--protocol sugarcrepe / winoground)")
    cmp.add_argument(
        "--features",
        metavar="DIR",
        help="for region models (ESL, VSE): a folder written by eslmatch extract over the benchmark's images "
        "(rows named by file name); models that take pixels read --image-root (default: none)",
    )
    s.set_defaults(func=run)


def _load_scores(path: str):
    import numpy as np

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
    import numpy as np

    from ..annotations.extended import extended_metrics, format_extended
    from ..evaluate import check_score_matrix, ensemble, evaluate_protocol, format_metrics, get_protocol
    from ..truth import check_truth, evaluate_truth, format_truth_metrics, load_truth
    from ..utils import atomic_save_npy

    if args.protocol in COMPOSITIONAL:
        return _run_compositional(args)
    protocol = get_protocol(args.protocol)
    save = Path(args.save_scores) if args.save_scores else None
    if save is not None and save.is_dir():
        raise EslmatchError(f"--save-scores {save}: is a directory")
    if args.batch_size < 1:
        raise EslmatchError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.features:
        raise EslmatchError("--features goes with --protocol sugarcrepe or winoground")
    if args.scores and args.precision:
        raise EslmatchError("--precision sets how models encode: it does not apply to --scores")
    extended = _check_extended_args(args, protocol.name)
    meta: dict = {}
    truth = None
    if args.truth:  # format errors before any encoding; counts are checked against the scores below
        truth = load_truth(args.truth, None, None)
    ids = None
    if args.scores:
        cpi = args.captions_per_image
        matrices = [check_score_matrix(_load_scores(p), cpi, p) for p in args.scores]
        meta["models"] = list(args.scores)
        if extended:
            ids = _checked_ids(args, matrices[0].shape, cpi, None)
    else:
        if not args.data:
            raise EslmatchError("--data is needed with --checkpoint")
        matrices, cpi, meta, ids = _score_with_models(args, protocol.default_split, bool(extended))
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
    if ids is not None:
        ext = extended_metrics(sims, ids[0], ids[1], sets=extended)
        result["extended"] = ext["extended"]
        result["extended_info"] = ext["info"]
    if save is not None:
        atomic_save_npy(save, np.asarray(sims, dtype=np.float32))
        result["saved_scores"] = str(save)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_metrics(result))
        if truth is not None:
            print("\n" + format_truth_metrics(result["truth"]))
        if ids is not None:
            print("\n" + format_extended(result["extended"], result["extended_info"]))
        if save is not None:
            print(f"saved the {sims.shape[0]} x {sims.shape[1]} score matrix to {save}")
    return 0


def _check_extended_args(args: argparse.Namespace, protocol: str) -> tuple[str, ...]:
    """The ``--extended`` sets, after refusing misplaced options and a missing package (before any loading)."""
    from ..annotations.coco import read_ids
    from ..annotations.extended import annotation_dir, parse_extended

    extended = parse_extended(args.extended)
    given = [o for o, v in (("--image-ids", args.image_ids), ("--caption-ids", args.caption_ids)) if v]
    given += ["--coco-captions"] if args.coco_captions else []
    if not extended:
        if given:
            raise EslmatchError(f"{given[0]} goes with --extended eccv,cxc")
        return ()
    if protocol != "coco5k":
        raise EslmatchError(
            f"--extended: the ECCV Caption and CxC annotations cover the COCO 5K test split: use --protocol coco5k, "
            f"not {protocol}"
        )
    annotation_dir()
    if args.scores and not (args.image_ids and args.caption_ids):
        raise EslmatchError(
            "--extended with --scores needs --image-ids (the COCO image id of each row) and --caption-ids "
            "(the COCO caption annotation id of each column)"
        )
    for path in (args.image_ids, args.caption_ids):
        if path:
            read_ids(path)  # the files' format, before any loading; counts are checked against the scores
    return extended


def _checked_ids(args: argparse.Namespace, shape: tuple[int, int], cpi: int, split) -> tuple[np.ndarray, np.ndarray]:
    """COCO image and caption ids of the score matrix: from the id files, or derived from ``split``
    (its image ids, its captions matched by text in --coco-captions), checked against the 5K split."""
    import numpy as np

    from ..annotations.coco import load_coco_captions, match_caption_ids, read_ids, resolve_image_ids
    from ..annotations.extended import check_ids

    coco = load_coco_captions(args.coco_captions) if args.coco_captions else None
    source = str(getattr(split, "captions_path", getattr(split, "source", "")))
    if args.image_ids:
        image_ids = read_ids(args.image_ids, shape[0], "image ids")
    elif split is not None and split.ids is not None:
        image_ids = resolve_image_ids(split.ids, coco, source)
    else:
        raise EslmatchError(
            f"{source}: the split names no image ids (no {split.name}_ids.txt): pass --image-ids, the COCO image "
            "id of each image, one per line"
        )
    if args.caption_ids:
        caption_ids = read_ids(args.caption_ids, shape[1], "caption ids")
    elif coco is not None:
        caption_ids = match_caption_ids(split.captions, np.repeat(image_ids, cpi), coco, source)
    else:
        raise EslmatchError(
            "--extended needs the COCO caption annotation id of every caption: pass --caption-ids FILE, or "
            "--coco-captions captions_val2014.json to match the captions by text"
        )
    return check_ids(
        image_ids,
        caption_ids,
        shape,
        cpi,
        image_source=args.image_ids or f"{source} (image ids)",
        caption_source=args.caption_ids or f"{source} (caption ids)",
    )


def _options(args: argparse.Namespace) -> ScoringOptions:
    from ..scoring import ScoringOptions

    if args.budget_mb is None:
        return ScoringOptions()
    if args.budget_mb <= 0:
        raise EslmatchError(f"--budget-mb must be positive, got {args.budget_mb}")
    return ScoringOptions(budget_bytes=int(args.budget_mb * (1 << 20)))


def _load_models(args: argparse.Namespace, device) -> list:
    """Every model, before any encoding: a bad one fails first."""
    from ..factory import load_model

    models = []
    for path in args.checkpoint:
        model = load_model(path, map_location=device, text_model=args.text_model)
        if model.tokenizer is None:
            raise EslmatchError(
                f"{path}: the model stores no tokenizer (released checkpoints do not): pass --text-model "
                f"with its BERT tokenizer's directory or name"
            )
        models.append(model)
    return models


def _score_with_models(args: argparse.Namespace, default_split: str, extended: bool):
    from ..data import open_split
    from ..evaluate import check_protocol_size, score_split
    from ..utils import resolve_device

    device = resolve_device(args.device)
    split_name = args.split or default_split
    options = _options(args)
    models = _load_models(args, device)
    pixel_models = [hasattr(m, "preprocess") for m in models]
    if any(pixel_models):
        if not all(pixel_models):
            raise EslmatchError("an ensemble must take one kind of input: pixels (ESL-CLIP) or region features")
        return _score_raw_images(args, models, split_name, device, options, extended)
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
    ids = _checked_ids(args, (split.n_images, split.n_captions), split.captions_per_image, split) if extended else None
    matrices = []
    for model in models:
        matrices.append(
            score_split(
                model,
                split,
                args.batch_size,
                device,
                progress=not args.no_progress,
                options=options,
                precision=args.precision or "fp32",
            )
        )
    meta = {"models": list(args.checkpoint), "split": split_name, "data": str(split.root), **_precision(args, device)}
    return matrices, split.captions_per_image, meta, ids


def _score_raw_images(args: argparse.Namespace, models: list, split_name: str, device, options, extended: bool):
    """Score models that take pixels on a raw-image split (images and captions encoded once)."""
    from ..data.raw import open_image_split
    from ..evaluate import check_protocol_size, score_image_split

    if not args.image_root:
        raise EslmatchError(
            "this model takes images: pass --image-root (the folder of the images) with --data "
            "(a Karpathy-split JSON or a captions TSV)"
        )
    split = open_image_split(args.data, args.image_root, split_name, args.captions_per_image)
    split.require_complete()
    check_protocol_size(args.protocol, split.n_images, args.fold_size)
    ids = _checked_ids(args, (split.n_images, split.n_captions), split.captions_per_image, split) if extended else None
    precision = args.precision or "fp32"
    matrices = [
        score_image_split(m, split, args.batch_size, device, options=options, precision=precision) for m in models
    ]
    meta = {"models": list(args.checkpoint), "split": split_name, "data": str(split.source), **_precision(args, device)}
    return matrices, split.captions_per_image, meta, ids


def _precision(args: argparse.Namespace, device) -> dict[str, str]:
    """The encoders' precision as run (``auto`` resolved), for the results."""
    from ..utils.precision import resolve_precision

    return {"precision": resolve_precision(args.precision or "fp32", device)}


def _run_compositional(args: argparse.Namespace) -> int:
    """``--protocol sugarcrepe`` / ``winoground``: every model scores the benchmark's pairs; an
    ensemble averages the pair scores."""
    import numpy as np

    from ..annotations import compositional as comp
    from ..utils import resolve_device

    misplaced = [
        opt
        for opt, value in (
            ("--scores", args.scores),
            ("--extended", args.extended),
            ("--image-ids", args.image_ids),
            ("--caption-ids", args.caption_ids),
            ("--coco-captions", args.coco_captions),
            ("--truth", args.truth),
            ("--save-scores", args.save_scores),
        )
        if value
    ]
    if misplaced:
        raise EslmatchError(f"{misplaced[0]} does not go with --protocol {args.protocol} (it scores models' pairs)")
    if args.batch_size < 1:
        raise EslmatchError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.data:
        raise EslmatchError(f"--protocol {args.protocol} needs --data (see docs/evaluation.md)")
    if not args.image_root and not args.features:
        raise EslmatchError("pass --image-root (models that take images) and/or --features (region models)")
    data = comp.load_sugarcrepe(args.data) if args.protocol == "sugarcrepe" else comp.load_winoground(args.data)
    features = comp.open_features(args.features, args.split or "test") if args.features else None
    inputs = comp.resolve_inputs(data, args.image_root, features)  # a missing image fails before any model loads
    device = resolve_device(args.device)
    options = _options(args)
    models = _load_models(args, device)
    for path, model in zip(args.checkpoint, models):
        comp.check_inputs(model, inputs, str(path))
        if features is not None and not hasattr(model, "preprocess") and model.config.img_dim != features.rows.shape[2]:
            raise EslmatchError(
                f"{path}: expects features of width {model.config.img_dim}, {features.folder} holds "
                f"{features.rows.shape[2]}"
            )
    precision = args.precision or "fp32"
    runs = [comp.score_compositional(m, data, inputs, args.batch_size, device, options, precision) for m in models]
    scores = np.mean(runs, axis=0)
    result = {
        "protocol": args.protocol,
        "models": list(args.checkpoint),
        "data": str(data.source),
        **_precision(args, device),
    }
    if args.protocol == "sugarcrepe":
        result["sugarcrepe"] = comp.sugarcrepe_metrics(data, scores)
    else:
        result["winoground"] = comp.winoground_metrics(data, scores)
    if len(models) > 1:
        result["ensemble"] = len(models)
    print(json.dumps(result, indent=2) if args.json else comp.format_compositional(result))
    return 0
