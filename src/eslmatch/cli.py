"""The ``eslmatch`` command line. Entry points stay thin: the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import EslmatchError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------- commands
@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from .factory import load_model, model_format

    fmt = model_format(args.checkpoint)
    model = load_model(args.checkpoint)
    c = model.config
    if args.json:
        print(json.dumps({"format": fmt, "config": c.to_dict(), "parameters": model.parameter_counts()}, indent=2))
        return 0
    print(f"model      {args.checkpoint}")
    print(f"format     {fmt}")
    print(f"type       {c.model_type.upper()} ({'ESL-A' if c.strategy == 'adaptive' else 'ESL-H'}, {c.strategy} strategy)")
    print(f"levels     E={c.embed_size} k={c.kernel_size} L={c.num_levels} widths={c.level_dims} Dt={c.total_dim}")
    text = c.text_encoder
    if text == "bert":
        bc = model.text_encoder.backbone.config
        text += f" ({c.text_model or 'config inferred from tensors'}; hidden {bc.hidden_size}, {bc.num_hidden_layers} layers, vocab {bc.vocab_size})"
    else:
        text += f" (vocab {c.vocab_size}, word_dim {c.word_dim})"
    print(f"text       {text}")
    print(f"image      region features of width {c.img_dim}")
    print(f"tokenizer  {'yes' if model.tokenizer is not None else 'none (score token ids, or pass --text-model)'}")
    print("parameters")
    for part, n in model.parameter_counts().items():
        print(f"  {part:<15} {n:>13,}")
    return 0


@command("convert")
def cmd_convert(args: argparse.Namespace) -> int:
    from .compat.official import load_official_checkpoint

    model = load_official_checkpoint(args.checkpoint, text_model=args.text_model)
    out = model.save_pretrained(args.out_dir)
    print(f"converted {args.checkpoint} -> {out} ({model.config.strategy}, {model.parameter_counts()['total']:,} parameters)")
    return 0


@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .factory import load_model

    model = load_model(args.model, map_location=args.device, text_model=args.text_model)
    path = Path(args.inputs)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EslmatchError(f"{path}: cannot read inputs ({exc})") from exc
    need = ["images", "captions", "cap_lens"]
    missing = [k for k in need if k not in data]
    if missing:
        raise EslmatchError(f"{path}: missing array(s) {', '.join(missing)} (need images, captions, cap_lens)")
    images = torch.from_numpy(np.asarray(data["images"], dtype=np.float32))
    img_len = torch.from_numpy(np.asarray(data["image_lengths"])).long() if "image_lengths" in data else None
    with torch.no_grad():
        sims = model.similarity(images, img_len, torch.from_numpy(data["captions"]).long(), torch.from_numpy(data["cap_lens"]).long()).cpu().numpy()
    print(f"scored {sims.shape[0]} images x {sims.shape[1]} captions with {args.model}")
    i2t = sims.argmax(1)
    for i in range(min(sims.shape[0], args.show)):
        print(f"  image {i:>3}: best caption {int(i2t[i]):>4} (score {sims[i, i2t[i]]:.4f})")
    if args.save:
        np.save(args.save, sims)
        print(f"saved scores to {args.save}")
    if args.compare:
        if args.compare not in data:
            raise EslmatchError(f"{path}: no array {args.compare!r} to compare with")
        ref = np.asarray(data[args.compare], dtype=np.float64)
        if ref.shape != sims.shape:
            raise EslmatchError(f"{args.compare} has shape {ref.shape}, scores have {sims.shape}")
        err = float(np.abs(sims - ref).max() / max(np.abs(ref).max(), 1e-30))
        ok = err <= args.tolerance
        print(f"max relative error vs {args.compare}: {err:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
        return 0 if ok else 1
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eslmatch", description="Image-text matching with ESL.")
    p.add_argument("--version", action="version", version=f"eslmatch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="describe a model (our directory format or a released .pth.tar)")
    s.add_argument("checkpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("convert", help="convert a released .pth.tar to our format (safetensors + JSON)")
    s.add_argument("checkpoint")
    s.add_argument("out_dir")
    s.add_argument("--text-model", help="BERT directory or name whose tokenizer is saved alongside")

    s = sub.add_parser("score", help="score images against captions from an .npz of inputs")
    s.add_argument("model", help="model directory or released .pth.tar")
    s.add_argument("--inputs", required=True, help=".npz with images (N,R,D), captions (M,W), cap_lens (M,) [image_lengths]")
    s.add_argument("--compare", help="name of an array in the .npz holding expected scores")
    s.add_argument("--tolerance", type=float, default=1e-5, help="max relative error for --compare")
    s.add_argument("--save", help="write the score matrix to this .npy")
    s.add_argument("--show", type=int, default=5, help="images whose best caption is printed")
    s.add_argument("--device", default="cpu")
    s.add_argument("--text-model", help="tokenizer for raw text (released checkpoints)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("eslmatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line unless --debug
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, EslmatchError):
            print(f"eslmatch: error: {msg}", file=sys.stderr)
        else:
            print(f"eslmatch: error: {type(exc).__name__}: {msg} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
