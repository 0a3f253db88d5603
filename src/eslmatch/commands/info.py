"""``eslmatch info MODEL``: configuration, strategy and parameter counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import EslmatchError

ORDER = 80


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("info", help="describe a model (our directory format or a released .pth.tar)")
    s.add_argument("checkpoint", help="a model folder (config.json + model.safetensors) or a released .pth.tar")
    s.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    s.add_argument(
        "--verify",
        action="store_true",
        help="read every byte of a model folder's weights and compare them with the sha256 recorded in its "
        "digest.json when it was written (default: the size + mtime cache is trusted)",
    )
    s.set_defaults(func=run)


def verify(checkpoint: str) -> str:
    """The folder's weights sha256, checked byte for byte against its ``digest.json``."""
    from ..factory import model_format
    from ..model.digest import DIGEST_NAME, verify_weights

    if model_format(checkpoint) != "eslmatch":
        raise EslmatchError(f"{checkpoint}: a released checkpoint records no digest: --verify checks a model folder")
    digest, recorded = verify_weights(Path(checkpoint), use_cache=False)
    if not recorded:
        raise EslmatchError(
            f"{checkpoint}: no {DIGEST_NAME} (written by an older eslmatch): nothing to verify against "
            f"(sha256 now {digest[:16]}...; load and save_pretrained it again to record one)"
        )
    return digest


def run(args: argparse.Namespace) -> int:
    from ..factory import load_model, model_format

    fmt = model_format(args.checkpoint)
    verified = verify(args.checkpoint) if args.verify else None
    model: Any = load_model(args.checkpoint)
    c = model.config
    if args.json:
        print(
            json.dumps(
                {
                    "format": fmt,
                    "config": c.to_dict(),
                    "parameters": model.parameter_counts(),
                    "weights": model.weights_digest,
                    "verified": verified is not None,
                },
                indent=2,
            )
        )
        return 0
    variant = "ESL-A" if c.strategy == "adaptive" else "ESL-H"
    print(f"model      {args.checkpoint}")
    print(f"format     {fmt}")
    if model.weights_digest:
        note = " (verified: every byte matches digest.json)" if verified else ""
        print(f"weights    sha256 {model.weights_digest['sha256']}{note}")
    if c.model_type == "esl-clip":
        a = c.clip
        print(f"type       ESL-CLIP ({variant}, {c.strategy} strategy; the CLIP-based branch)")
        print(f"levels     E={c.embed_size} k={c.kernel_size} L={c.num_levels} widths={c.level_dims} Dt={c.total_dim}")
        print(f"image      ViT {a.image_size}px patch {a.patch_size}, width {a.vision_width}, {a.vision_layers} layers")
        print(f"text       CLIP BPE, context {a.context_length}, width {a.text_width}, {a.text_layers} layers")
    else:
        print(f"type       {c.model_type.upper()} ({variant}, {c.strategy} strategy)")
        print(f"levels     E={c.embed_size} k={c.kernel_size} L={c.num_levels} widths={c.level_dims} Dt={c.total_dim}")
        text = c.text_encoder
        if text == "bert":
            bc = model.text_encoder.backbone.config
            source = c.text_model or "config inferred from tensors"
            text += f" ({source}; hidden {bc.hidden_size}, {bc.num_hidden_layers} layers, vocab {bc.vocab_size})"
        else:
            text += f" (vocab {c.vocab_size}, word_dim {c.word_dim})"
        print(f"text       {text}")
        print(f"image      region features of width {c.img_dim}")
    print(f"tokenizer  {'yes' if model.tokenizer is not None else 'none (score token ids, or pass --text-model)'}")
    print("parameters")
    for part, n in model.parameter_counts().items():
        print(f"  {part:<15} {n:>13,}")
    return 0
