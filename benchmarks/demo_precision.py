"""The demo's test ranking with bf16 query and gallery encoders against fp32, and the index
vectors' agreement (bf16 autocast and ONNX Runtime int8 against fp32 eager), per item.

Reads a demo report (``eslmatch demo --out demo_report``, fp32 run): its ESL model and its
dataset (the test PNGs kept in the cache). The gallery side is the whole chain, EfficientNet-Lite0
extraction then the model's image encoder; the query side MiniLM then the text encoder. fp32:
the report's fp32 features and fp32 encoders; bf16: the test PNGs extracted again in bf16
(channels-last) and every encoder in bf16 autocast; scores float32 in both.

    python benchmarks/demo_precision.py --report demo_report
    # writes benchmarks/results/demo-precision-cpu.{json,md}

Figures: truth t2i P@1 of each (any true image counts, as the demo reports it), the mean top-10
overlap of the caption -> image rankings, and the minimum over the test split of each item's
cosine with fp32 (image and caption index vectors; int8: the model's ONNX export quantised
dynamically, run on the fp32 features).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eslmatch.data import open_split
from eslmatch.evaluate import score_split
from eslmatch.export.onnx import OnnxEncoders, export_onnx
from eslmatch.extract import extract_folder
from eslmatch.extract.embed import index_vectors
from eslmatch.factory import load_model
from eslmatch.truth import load_truth, truth_metrics, truth_path
from eslmatch.utils.precision import cpu_capabilities

RESULTS = Path(__file__).resolve().parent / "results"


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over captions (columns) of |top-k images of ``a`` and of ``b``| / k."""
    ta = np.argsort(-a, axis=0, kind="stable")[:k].T
    tb = np.argsort(-b, axis=0, kind="stable")[:k].T
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def min_cosine(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=1).min())


def vectors(model, split, precision: str, onnx: OnnxEncoders | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors ``(N, K)`` of the split's images and ``(M, K)`` of its captions."""
    images = torch.from_numpy(np.asarray(split.read_images(slice(None)), dtype=np.float32))
    ids, lens = model.tokenize(split.captions)
    if onnx is not None:
        return onnx.image_vectors(images), onnx.caption_vectors(ids, lens)
    return index_vectors(model, "features", images, precision), index_vectors(model, "captions", (ids, lens), precision)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, default=Path("demo_report"))
    ap.add_argument("--out", type=Path, default=RESULTS / "demo-precision-cpu")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    metrics = json.loads((args.report / "metrics.json").read_text())
    if metrics["settings"].get("precision", "fp32") != "fp32":
        raise SystemExit(f"{args.report}: give the report of an fp32 demo run (eslmatch demo --precision fp32)")
    data = Path(metrics["dataset"])
    model = load_model(args.report / "run_esl" / "best").eval()
    fp32_split = open_split(data, "test")
    truth = load_truth(truth_path(data, "test"), fp32_split.n_images, fp32_split.n_captions)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract_folder(
            data.parent / "raw" / "images" / "test",
            Path(tmp) / "bf16",
            captions=data.parent / "raw" / "test_captions.txt",
            split="test",
            image_size=metrics["settings"]["feature_size"],
            progress=False,
            relative_paths=True,
            precision="bf16",
            device="cpu",
            log=lambda m: None,
        )
        extract_s = time.perf_counter() - t0
        bf16_split = open_split(Path(tmp) / "bf16", "test")
        sims = {
            "fp32": score_split(model, fp32_split, progress=False, precision="fp32"),
            "bf16": score_split(model, bf16_split, progress=False, precision="bf16"),
            "bf16_encoders": score_split(model, fp32_split, progress=False, precision="bf16"),
        }
        ref_img, ref_cap = vectors(model, fp32_split, "fp32")
        bf_img, bf_cap = vectors(model, bf16_split, "bf16")
        enc_img, _ = vectors(model, fp32_split, "bf16")
        export_onnx(model, Path(tmp) / "onnx", quantize="int8")
        q_img, q_cap = vectors(model, fp32_split, "fp32", OnnxEncoders.open(Path(tmp) / "onnx", variant="int8"))
    p1 = {name: truth_metrics(s, truth)["t2i"]["p1"] for name, s in sims.items()}
    record = {
        "cpu": cpu_capabilities(),
        "threads": torch.get_num_threads(),
        "report": str(args.report),
        "test": {"images": fp32_split.n_images, "captions": fp32_split.n_captions},
        "truth_t2i_p1": p1,
        "truth_p1_difference_points": round(p1["bf16"] - p1["fp32"], 2),
        "truth_p1_difference_points_encoders_only": round(p1["bf16_encoders"] - p1["fp32"], 2),
        "top10_overlap_t2i": top_k_overlap(sims["fp32"], sims["bf16"]),
        "top10_overlap_t2i_encoders_only": top_k_overlap(sims["fp32"], sims["bf16_encoders"]),
        "min_cosine": {
            "bf16_images": min_cosine(ref_img, bf_img),
            "bf16_images_encoders_only": min_cosine(ref_img, enc_img),
            "bf16_captions": min_cosine(ref_cap, bf_cap),
            "int8_images": min_cosine(ref_img, q_img),
            "int8_captions": min_cosine(ref_cap, q_cap),
        },
        "bf16_extraction_seconds": round(extract_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    c = record["min_cosine"]
    lines = [
        f"Demo test split ({fp32_split.n_images} images x {fp32_split.n_captions} captions), ESL of {args.report}; "
        f"CPU {record['cpu'].get('cpu_name')} ({record['cpu']['capability']}, avx512_bf16 "
        f"{record['cpu']['avx512_bf16']}, amx_bf16 {record['cpu']['amx_bf16']}), {record['threads']} threads",
        "",
        "| figure | fp32 | bf16 model encoders (fp32 features) | bf16 extractor + encoders |",
        "| --- | ---: | ---: | ---: |",
        f"| truth t2i P@1 | {p1['fp32']:.2f} | {p1['bf16_encoders']:.2f} "
        f"({record['truth_p1_difference_points_encoders_only']:+.2f} points) | {p1['bf16']:.2f} "
        f"({record['truth_p1_difference_points']:+.2f} points) |",
        f"| top-10 overlap of each caption's ranking | 1 | {record['top10_overlap_t2i_encoders_only']:.4f} | "
        f"{record['top10_overlap_t2i']:.4f} |",
        "",
        "Minimum over the test split of each item's cosine with fp32 eager (index vectors):",
        "",
        "| variant | images | captions |",
        "| --- | ---: | ---: |",
        f"| bf16 autocast, model encoders on fp32 features | {c['bf16_images_encoders_only']:.5f} | "
        f"{c['bf16_captions']:.5f} |",
        f"| bf16 autocast, extractor + model encoders | {c['bf16_images']:.5f} | {c['bf16_captions']:.5f} |",
        f"| ONNX Runtime int8 (dynamic) | {c['int8_images']:.5f} | {c['int8_captions']:.5f} |",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
