"""``eslmatch convert RELEASED.pth.tar OUT_DIR``: to our safetensors + JSON format."""

from __future__ import annotations

import argparse

ORDER = 81


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("convert", help="convert a released .pth.tar to our format (safetensors + JSON)")
    s.add_argument("checkpoint", help="a released .pth.tar (BERT + regions ESL, or the CLIP-based branch)")
    s.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, digest.json)")
    s.add_argument(
        "--text-model",
        help="BERT directory or name whose tokenizer is saved alongside (default: none; token ids only)",
    )
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compat.official import load_official_checkpoint

    model = load_official_checkpoint(args.checkpoint, text_model=args.text_model)
    out = model.save_pretrained(args.out_dir)
    total = model.parameter_counts()["total"]
    print(f"converted {args.checkpoint} -> {out} ({model.config.strategy}, {total:,} parameters)")
    return 0
