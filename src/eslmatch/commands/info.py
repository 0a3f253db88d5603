"""``eslmatch info MODEL``: configuration, strategy and parameter counts."""

from __future__ import annotations

import argparse
import json

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


def run(args: argparse.Namespace) -> int:
    """Load the model (after ``--verify`` checked its weights); print :func:`describe_model` or :func:`format_model`."""
    from ..factory import load_model
    from ..model.describe import describe_model, format_model, verify_checkpoint

    if args.verify:
        verify_checkpoint(args.checkpoint)  # refused unless every byte matches digest.json
    model = load_model(args.checkpoint)
    if args.json:
        print(json.dumps(describe_model(model, args.checkpoint, args.verify), indent=2))
    else:
        print(format_model(model, args.checkpoint, args.verify))
    return 0
