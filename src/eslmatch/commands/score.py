"""``eslmatch score MODEL --inputs FILE.npz``: score region features against token ids."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..errors import EslmatchError
from ..factory import load_model

ORDER = 82


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help="score images against captions from an .npz of inputs")
    s.add_argument("model", help="model directory or released .pth.tar")
    s.add_argument(
        "--inputs",
        required=True,
        help=".npz with images (N,R,D), captions (M,W), cap_lens (M,) [image_lengths]",
    )
    s.add_argument("--compare", help="name of an array in the .npz holding expected scores")
    s.add_argument("--tolerance", type=float, default=1e-5, help="max relative error for --compare")
    s.add_argument("--save", help="write the score matrix to this .npy")
    s.add_argument("--show", type=int, default=5, help="images whose best caption is printed")
    s.add_argument("--device", default="cpu")
    s.add_argument("--text-model", help="tokenizer for raw text (released checkpoints)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    path = Path(args.inputs)
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise EslmatchError(f"{path}: cannot read inputs ({exc})") from exc
    missing = [k for k in ("images", "captions", "cap_lens") if k not in arrays]
    if missing:
        raise EslmatchError(f"{path}: missing array(s) {', '.join(missing)} (need images, captions, cap_lens)")
    model = load_model(args.model, map_location=args.device, text_model=args.text_model)
    images = torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32))
    img_len = torch.from_numpy(np.asarray(arrays["image_lengths"])).long() if "image_lengths" in arrays else None
    captions = torch.from_numpy(np.asarray(arrays["captions"])).long()
    cap_len = torch.from_numpy(np.asarray(arrays["cap_lens"])).long()
    with torch.no_grad():
        sims = model.similarity(images, img_len, captions, cap_len).cpu().numpy()
    print(f"scored {sims.shape[0]} images x {sims.shape[1]} captions with {args.model}")
    best = sims.argmax(1)
    for i in range(min(sims.shape[0], args.show)):
        print(f"  image {i:>3}: best caption {int(best[i]):>4} (score {sims[i, best[i]]:.4f})")
    if args.save:
        np.save(args.save, sims)
        print(f"saved scores to {args.save}")
    if args.compare:
        if args.compare not in arrays:
            raise EslmatchError(f"{path}: no array {args.compare!r} to compare with")
        ref = np.asarray(arrays[args.compare], dtype=np.float64)
        if ref.shape != sims.shape:
            raise EslmatchError(f"{args.compare} has shape {ref.shape}, scores have {sims.shape}")
        err = float(np.abs(sims - ref).max() / max(np.abs(ref).max(), 1e-30))
        ok = err <= args.tolerance
        print(
            f"max relative error vs {args.compare}: {err:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})"
        )
        return 0 if ok else 1
    return 0
