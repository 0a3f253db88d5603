"""``eslmatch eval``: recall metrics of one model, an ensemble, or saved score matrices; the
extended COCO 5K annotations (ECCV Caption, CxC); the SugarCrepe and Winoground benchmarks.

The command parses and prints; :func:`eslmatch.evaluate.run.evaluate` computes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from ..utils.choices import COMPOSITIONAL_PROTOCOLS, PRECISIONS, RECALL_PROTOCOLS

if TYPE_CHECKING:
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


def _options(args: argparse.Namespace) -> ScoringOptions | None:
    """The scoring engine's options of ``--budget-mb`` (``None``: the defaults)."""
    if args.budget_mb is None:
        return None
    if args.budget_mb <= 0:
        raise EslmatchError(f"--budget-mb must be positive, got {args.budget_mb}")
    from ..scoring import ScoringOptions

    return ScoringOptions(budget_bytes=int(args.budget_mb * (1 << 20)))


def run(args: argparse.Namespace) -> int:
    """Turn the options into one :func:`eslmatch.evaluate.run.evaluate` call; print its table or JSON."""
    from ..evaluate.run import evaluate, format_evaluation

    result = evaluate(
        args.protocol, models=args.checkpoint or (), scores=args.scores or (), data=args.data,
        image_root=args.image_root, data_name=args.data_name, split=args.split, precision=args.precision,
        fold_size=args.fold_size, captions_per_image=args.captions_per_image, text_model=args.text_model,
        truth=args.truth, save_scores=args.save_scores, batch_size=args.batch_size, device=args.device,
        options=_options(args), full_check=args.full_check, progress=not args.no_progress,
        extended=args.extended, image_ids=args.image_ids, caption_ids=args.caption_ids,
        coco_captions=args.coco_captions or (), features=args.features,
    )  # fmt: skip
    print(result.to_json() if args.json else format_evaluation(result))
    return 0
