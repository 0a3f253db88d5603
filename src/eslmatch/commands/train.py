"""``eslmatch train --config FILE [KEY=VALUE ...] [--resume]``: train or resume a model."""

from __future__ import annotations

import argparse

ORDER = 20


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train an ESL (or VSE baseline) model on precomp features",
        description="Train from a YAML configuration (see configs/ and docs/training.md). "
        "Run it under torchrun for several processes or machines (docs/distributed.md).",
    )
    t.add_argument(
        "--config",
        help="YAML training configuration: a file, or a packaged one by name (f30k_bert, coco_clip, own_photos...) "
        "(default: none: the configuration is the KEY=VALUE overrides alone)",
    )
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override configuration keys, e.g. epochs=2 batch_size=32 model.embed_size=64",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run saved in output_dir (exactly where it stopped)"
    )
    t.add_argument(
        "--init-from",
        metavar="MODEL",
        help="fine-tune: start from a released .pth.tar or one of our model folders (init_from=...; default: the "
        "configuration's init_from, else fresh weights)",
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..training import fit, load_train_config

    overrides = list(args.overrides) + ([f"init_from={args.init_from}"] if args.init_from else [])
    cfg = load_train_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    result = fit(cfg, resume=args.resume)
    if result.rank != 0:
        return 0
    best = "n/a" if result.best_rsum is None else f"{result.best_rsum:.2f}"
    print(
        f"done: {result.global_step} steps, {result.epochs_done} epochs, best {result.val_split} rsum {best}, "
        f"output {result.output_dir}"
    )
    return 0
