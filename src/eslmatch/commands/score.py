"""``eslmatch score MODEL --inputs FILE.npz``: score region features against token ids."""

from __future__ import annotations

import argparse

ORDER = 82


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help="score images against captions from an .npz of inputs")
    s.add_argument("model", help="model directory or released .pth.tar (ESL, VSE or ESL-CLIP)")
    s.add_argument(
        "--inputs",
        required=True,
        help=".npz of images and captions. Region models: images (N,R,D) region features, captions (M,W) token "
        "ids, cap_lens (M,), optional image_lengths (N,). Models that take pixels (ESL-CLIP): images (N,3,H,W) "
        "preprocessed pixels, captions (M,77) token ids (cap_lens optional: the end token marks the length). "
        "captions may instead be a string array (M,), tokenised by the model",
    )
    s.add_argument("--compare", help="name of an array in the .npz holding expected scores (N,M) (default: none)")
    s.add_argument("--tolerance", type=float, default=1e-5, help="max relative error for --compare (default 1e-5)")
    s.add_argument("--save", help="write the score matrix (N,M) to this .npy (default: not saved)")
    s.add_argument("--show", type=int, default=5, help="images whose best caption is printed (default 5)")
    s.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    s.add_argument(
        "--text-model",
        help="tokenizer for string captions of a released BERT checkpoint (default: the model's own)",
    )
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the inputs (refused before the model loads), score them, print the best captions."""
    from ..factory import load_model
    from ..scoring.inputs import read_score_inputs, relative_error, score_inputs
    from ..utils.io import atomic_save_npy

    arrays = read_score_inputs(args.inputs)
    model = load_model(args.model, map_location=args.device, text_model=args.text_model)
    sims = score_inputs(model, arrays, args.inputs, args.device)
    print(f"scored {sims.shape[0]} images x {sims.shape[1]} captions with {args.model}")
    best = sims.argmax(1)
    for i in range(min(sims.shape[0], args.show)):
        print(f"  image {i:>3}: best caption {int(best[i]):>4} (score {sims[i, best[i]]:.4f})")
    if args.save:
        atomic_save_npy(args.save, sims)
        print(f"saved scores to {args.save}")
    if not args.compare:
        return 0
    err = relative_error(sims, arrays, args.compare, args.inputs)
    ok = err <= args.tolerance
    print(f"max relative error vs {args.compare}: {err:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1
