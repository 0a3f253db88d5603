"""``eslmatch export MODEL --format onnx --out DIR``: the model's encoders as ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 70


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "export",
        help="export a model's image and text encoders (ONNX)",
        description="Write image_encoder.onnx and text_encoder.onnx (dynamic batch and length axes), "
        "encoders.json (inputs, outputs, shapes, agreement with PyTorch) and the tokenizer into --out. "
        "Needs the onnx extra: pip install 'eslmatch[onnx]'.",
    )
    s.add_argument("model", metavar="MODEL", help="a model folder (save_pretrained) or a released checkpoint")
    s.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx, the only one)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced whole, atomically)")
    s.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write *.int8.onnx: ONNX Runtime dynamic quantisation (default: fp32 only)",
    )
    s.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    s.add_argument(
        "--text-model",
        metavar="DIR",
        help="tokenizer for a released checkpoint (default: the model's own; a released one stores none)",
    )
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import check_opset, check_out_dir, require_onnx

    # Everything that can be refused is refused before the model loads.
    require_onnx()
    out = Path(args.out)
    check_out_dir(out)
    check_opset(args.opset)
    from ..export.onnx import export_onnx
    from ..factory import load_model, model_format

    model_format(args.model)
    model = load_model(args.model, text_model=args.text_model)
    manifest = export_onnx(model, out, quantize=args.quantize, opset=args.opset)
    for side, info in manifest["encoders"].items():
        agree = ", ".join(
            f"{v}: max rel err {a['max_rel_err']:.1e}, min cosine {a['min_cosine']:.5f}"
            for v, a in info["agreement"].items()
        )
        print(f"{side}: {' + '.join(info['files'].values())} ({agree})")
    print(f"wrote {out} ({manifest['family']}, {'one-stage' if manifest['exact_index'] else 'two-stage'})")
    return 0
