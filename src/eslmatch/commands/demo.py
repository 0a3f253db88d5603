"""``eslmatch demo``: build the embedded dataset, train ESL and VSE, evaluate, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo.settings import DemoSettings
from ..errors import EslmatchError
from ..utils.choices import MEASURED_RUNTIMES, PRECISIONS
from ..utils.io import default_cache_dir

ORDER = 1


# The recipe's numbers: (flag, DemoSettings field, least value, help); default from the settings.
NUMBERS = (
    ("--train", "n_train", 1, "training images, 5 captions each"),
    ("--dev", "n_dev", 1, "validation images"),
    ("--test", "n_test", 1, "test images (1,000: as many as Flickr30K's test split)"),
    ("--feature-size", "feature_size", 1, "extractor input size in pixels (192: a 6 x 6 region grid)"),
    ("--epochs", "epochs", 1, "training epochs"),
    ("--batch-size", "batch_size", 1, "training pairs per step"),
    ("--embed-size", "embed_size", 1, "joint embedding size E"),
    ("--levels", "num_levels", 1, "number of ESL levels L"),
    ("--seed", "seed", None, "seed of the dataset, initialisation and batches"),
    ("--text-layers", "text_train_layers", 0, "MiniLM layers fine-tuned, from the top (0: frozen; at most 6)"),
    (
        "--warmup-epochs",
        "warmup_epochs",
        0,
        "epochs of the hinge summed over all negatives before the hardest negatives",
    ),
)


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoSettings()
    s = sub.add_parser("demo", help="the whole workflow on the embedded dataset (offline, ~10 minutes on 2 cores)")
    s.add_argument("--out", type=Path, default=d.out_dir, help=f"report folder (default {d.out_dir})")
    s.add_argument("--cache", type=Path, help="dataset cache (default $ESLMATCH_CACHE or ~/.cache/eslmatch)")
    for flag, name, _, text in NUMBERS:
        s.add_argument(flag, dest=name, type=int, default=getattr(d, name), help=f"{text} (default {getattr(d, name)})")
    s.add_argument(
        "--strategy",
        choices=["adaptive", "heuristic"],
        default=d.strategy,
        help=f"level construction: adaptive (ESL-A) or heuristic (ESL-H) (default {d.strategy})",
    )
    s.add_argument(
        "--no-truth-mask",
        action="store_true",
        help="treat every other pair of a batch as a negative (the released recipe), even pairs the truth calls true",
    )
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="precision of the feature extractor, training's forward pass and the encoders of evaluation and the "
        f"index: fp32, bf16 (autocast) or auto = bf16 where the CPU computes it natively (default {d.precision}); "
        "scores stay float32",
    )
    s.add_argument(
        "--runtime",
        choices=MEASURED_RUNTIMES,
        default=None,
        help="what runs the feature extractor on CPU: auto = the fastest that agrees with float32 eager "
        "(measured once, cached), torch = the reference computation, onnxruntime "
        f"(default {d.runtime}; torch with --precision fp32: the figures of earlier versions, bit for bit)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag, name, least, _ in NUMBERS:
        if least is not None and getattr(args, name) < least:
            raise EslmatchError(f"{flag} must be at least {least}, got {getattr(args, name)}")
    if args.text_train_layers > 6:
        raise EslmatchError(f"--text-layers must lie in 0..6 (MiniLM has 6 layers), got {args.text_train_layers}")
    settings = DemoSettings(
        **{name: getattr(args, name) for _, name, _, _ in NUMBERS},
        strategy=args.strategy,
        mask_true_pairs=not args.no_truth_mask,
        cache_dir=args.cache or default_cache_dir(),
        out_dir=args.out,
        progress=not args.no_progress,
        precision=args.precision,
        runtime=args.runtime or ("torch" if args.precision == "fp32" else DemoSettings.runtime),
    )
    from ..demo.pipeline import run_demo

    run_demo(settings)
    return 0
