"""``eslmatch score MODEL --inputs FILE.npz``: score region features against token ids."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EslmatchError
from ..utils.io import atomic_save_npy

if TYPE_CHECKING:
    import torch

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


def _read_inputs(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EslmatchError(f"{path}: no such inputs file" if not path.exists() else f"{path}: not a file")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("an .npy array, not an .npz archive")
        return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise EslmatchError(f"{path}: cannot read inputs ({_first(exc)})") from exc


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _captions(model: Any, arrays: dict[str, np.ndarray], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (M, W), lengths (M,))`` from token ids (+ ``cap_lens``) or from strings."""
    import torch

    caps = arrays["captions"]
    if caps.dtype.kind in "US":
        return model.tokenize([str(c) for c in caps.reshape(-1)])
    ids = torch.from_numpy(np.asarray(caps)).long()
    if "cap_lens" in arrays:
        return ids, torch.from_numpy(np.asarray(arrays["cap_lens"])).long()
    if model.inputs != "pixels":
        raise EslmatchError(f"{path}: missing array cap_lens (token ids of a region model need their lengths)")
    # CLIP-style ids: zeros after the end token, so the length is the count up to the last non-zero
    nonzero = (ids != 0).long()
    return ids, (nonzero.shape[1] - nonzero.flip(1).argmax(1)).clamp(min=1)


def run(args: argparse.Namespace) -> int:
    path = Path(args.inputs)
    arrays = _read_inputs(path)
    missing = [k for k in ("images", "captions") if k not in arrays]
    if missing:
        raise EslmatchError(f"{path}: missing array(s) {', '.join(missing)} (need images and captions)")
    import torch

    from ..factory import load_model

    model: Any = load_model(args.model, map_location=args.device, text_model=args.text_model)
    images = torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32))
    img_len = torch.from_numpy(np.asarray(arrays["image_lengths"])).long() if "image_lengths" in arrays else None
    captions, cap_len = _captions(model, arrays, path)
    with torch.no_grad():
        sims = model.similarity(images.to(args.device), img_len, captions.to(args.device), cap_len).cpu().numpy()
    print(f"scored {sims.shape[0]} images x {sims.shape[1]} captions with {args.model}")
    best = sims.argmax(1)
    for i in range(min(sims.shape[0], args.show)):
        print(f"  image {i:>3}: best caption {int(best[i]):>4} (score {sims[i, best[i]]:.4f})")
    if args.save:
        atomic_save_npy(args.save, sims)
        print(f"saved scores to {args.save}")
    return _compare(args, arrays, sims, path) if args.compare else 0


def _compare(args: argparse.Namespace, arrays: dict[str, np.ndarray], sims: np.ndarray, path: Path) -> int:
    if args.compare not in arrays:
        raise EslmatchError(f"{path}: no array {args.compare!r} to compare with")
    ref = np.asarray(arrays[args.compare], dtype=np.float64)
    if ref.shape != sims.shape:
        raise EslmatchError(f"{args.compare} has shape {ref.shape}, scores have {sims.shape}")
    err = float(np.abs(sims - ref).max() / max(np.abs(ref).max(), 1e-30))
    ok = err <= args.tolerance
    print(f"max relative error vs {args.compare}: {err:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1
