"""``eslmatch demo``: build the embedded dataset, train ESL and VSE, evaluate, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo.settings import DemoSettings
from ..errors import EslmatchError
from ..utils.choices import MEASURED_RUNTIMES, PRECISIONS
from ..utils.io import default_cache_dir

ORDER = 1


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoSettings()
    s = sub.add_parser(
        "demo",
        help="the whole workflow on the embedded dataset (offline, ~10 minutes on 2 cores)",
    )
    s.add_argument(
        "--out",
        type=Path,
        default=d.out_dir,
        help=f"report folder (default {d.out_dir})",
    )
    s.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="dataset cache (default $ESLMATCH_CACHE or ~/.cache/eslmatch)",
    )
    s.add_argument(
        "--train", type=int, default=d.n_train, help=f"training images, 5 captions each (default {d.n_train})"
    )
    s.add_argument("--dev", type=int, default=d.n_dev, help=f"validation images (default {d.n_dev})")
    s.add_argument(
        "--test",
        type=int,
        default=d.n_test,
        help=f"test images (default {d.n_test}, as many as Flickr30K's test split)",
    )
    s.add_argument(
        "--feature-size",
        type=int,
        default=d.feature_size,
        help=f"extractor input size in pixels (default {d.feature_size}: a 6 x 6 region grid)",
    )
    s.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    s.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"training pairs per step (default {d.batch_size})"
    )
    s.add_argument(
        "--embed-size", type=int, default=d.embed_size, help=f"joint embedding size E (default {d.embed_size})"
    )
    s.add_argument(
        "--levels",
        type=int,
        default=d.num_levels,
        help=f"number of ESL levels L (default {d.num_levels})",
    )
    s.add_argument(
        "--strategy",
        choices=["adaptive", "heuristic"],
        default=d.strategy,
        help=f"level construction: adaptive (ESL-A) or heuristic (ESL-H) (default {d.strategy})",
    )
    s.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of the dataset, initialisation and batches (default {d.seed})"
    )
    s.add_argument(
        "--text-layers",
        type=int,
        default=d.text_train_layers,
        help=f"MiniLM layers fine-tuned, from the top (default {d.text_train_layers}; 0: frozen)",
    )
    s.add_argument(
        "--warmup-epochs",
        type=int,
        default=d.warmup_epochs,
        help=f"epochs of the hinge summed over all negatives before the hardest negatives (default {d.warmup_epochs})",
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
    for name in (
        "train",
        "dev",
        "test",
        "epochs",
        "batch_size",
        "embed_size",
        "feature_size",
    ):
        if getattr(args, name) < 1:
            raise EslmatchError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.text_layers <= 6:
        raise EslmatchError(f"--text-layers must lie in 0..6 (MiniLM has 6 layers), got {args.text_layers}")
    if args.warmup_epochs < 0:
        raise EslmatchError(f"--warmup-epochs must be at least 0, got {args.warmup_epochs}")
    settings = DemoSettings(
        n_train=args.train,
        n_dev=args.dev,
        n_test=args.test,
        seed=args.seed,
        epochs=args.epochs,
        feature_size=args.feature_size,
        batch_size=args.batch_size,
        embed_size=args.embed_size,
        num_levels=args.levels,
        strategy=args.strategy,
        text_train_layers=args.text_layers,
        warmup_epochs=args.warmup_epochs,
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
