"""Benchmark of the all-pairs scoring engine against the released code's per-caption loop.

Run from the repository root::

    python benchmarks/scoring.py                      # CPU, 1000 images x 5000 captions
    python benchmarks/scoring.py --quick              # small shapes, a smoke run
    python benchmarks/scoring.py --precision fp32,bf16
    python benchmarks/scoring.py --device cuda        # adds 5000 x 25000 (GPU only)

The model has random weights (E = 512, L = 8, k = 2, adaptive, R = 36 regions of 2048-d
features, GRU text encoder) and caption lengths are drawn like tokenised Flickr30K captions
(8-30 tokens, mean ~16). The baseline follows the released code's structure: per caption,
the caption is repeated across all images, each of the 9 levels computes
``X_l @ D_l @ Y_l^T``, the levels are summed and the released pooling (with its transposes
and contiguous copies) runs on all images. It is timed on a subset of captions and
extrapolated to all of them (the table says so). The engine's scores on that subset are
compared with the baseline's. A training step (batch 128: encoders, score matrix with
autograd, hinge loss, backward) is timed with the engine and with the literal loop.

Results are printed as a table and written to ``benchmarks/results/`` (markdown + JSON,
naming the machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eslmatch import ESLModel
from eslmatch.config import ESLConfig
from eslmatch.scoring import DEFAULT_BUDGET_BYTES, ScoringOptions

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- inputs
def build_model(device: torch.device, vocab: int = 1000) -> ESLModel:
    torch.manual_seed(0)
    cfg = ESLConfig(
        embed_size=512,
        kernel_size=2,
        num_levels=8,
        img_dim=2048,
        strategy="adaptive",
        text_encoder="gru",
        text_model=None,
        vocab_size=vocab,
        word_dim=300,
    )
    return ESLModel(cfg).to(device).eval()


def caption_lengths(m: int, seed: int) -> torch.Tensor:
    """Token counts like tokenised Flickr30K captions: 8-30, mean ~16."""
    torch.manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(0.25))  # mean 8
    return (8 + gamma.sample((m,))).round().clamp(8, 30).long()


def make_batch(n: int, m: int, seed: int, vocab: int = 1000, regions: int = 36, img_dim: int = 2048):
    g = torch.Generator().manual_seed(seed)
    images = torch.relu(torch.randn(n, regions, img_dim, generator=g))
    lens = caption_lengths(m, seed)
    ids = torch.zeros(m, int(lens.max()), dtype=torch.long)
    for j, k in enumerate(lens.tolist()):
        ids[j, :k] = torch.randint(1, vocab, (k,), generator=g)
    return images, ids, lens


@torch.no_grad()
def embed(model: ESLModel, images, ids, lens, device, batch: int = 500):
    img = torch.cat([model.embed_images(images[i : i + batch].to(device)) for i in range(0, len(images), batch)])
    caps = []
    width = ids.shape[1]
    for i in range(0, len(ids), batch):
        f = model.embed_captions(ids[i : i + batch].to(device), lens[i : i + batch])
        caps.append(F.pad(f, (0, 0, 0, width - f.shape[1])))
    return img, torch.cat(caps)


# ---------------------------------------------------------------------------- baseline
def _l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def _released_weights(attn: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    a = F.leaky_relu(attn.transpose(1, 2).contiguous(), 0.1)
    a = _l2(a, 2).transpose(1, 2).contiguous()
    return F.softmax(a * smooth, dim=2)


def released_loop(img_levels, cap_levels, cap_lens, ds, dims, smooth) -> torch.Tensor:
    """The released code's scoring structure: one caption at a time against every image.

    Returns ``(N, K)`` for the ``K`` captions given.
    """
    bounds = [sum(dims[:i]) for i in range(len(dims) + 1)]
    n_img = img_levels.shape[0]
    cols = []
    for i in range(cap_levels.shape[0]):
        nw = int(cap_lens[i])
        attn = 0
        for lv in range(len(dims)):
            x = cap_levels[i, :nw, bounds[lv] : bounds[lv + 1]].unsqueeze(0).repeat(n_img, 1, 1)
            y = img_levels[:, :, bounds[lv] : bounds[lv + 1]]
            attn = attn + x @ ds[lv] @ y.transpose(1, 2)
        attn_t = attn.transpose(1, 2).contiguous()
        t2i = attn.mul(_released_weights(torch.tanh(attn), smooth)).sum(-1).mean(dim=1, keepdim=True)
        i2t = attn_t.mul(_released_weights(torch.tanh(attn_t), smooth)).sum(-1).mean(dim=1, keepdim=True)
        cols.append(t2i + i2t)
    return torch.cat(cols, 1)


# ---------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the RSS high-water mark on Linux
    (``/proc/self/clear_refs`` resets it; no psutil needed)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.resettable = True
            except OSError:
                self.resettable = False
            self.start = self._status("VmRSS") or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.resettable:
            hwm = self._status("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm - self.start)


# Process CPU seconds of the last timed() call (all threads): wall time close to
# cpu / cores means the run had the cores to itself.
LAST_CPU_SECONDS = [0.0]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, int | None]:
    peak = PeakMemory(device)
    with peak:
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        sync(device)
        dt = time.perf_counter() - t0
        LAST_CPU_SECONDS[0] = time.process_time() - c0
    return out, dt, peak.peak_bytes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def gemm_throughput(device: torch.device, size: int = 4096, reps: int = 3) -> float:
    """fp32 GFLOP/s of one large ``torch.matmul`` (the floor of the affinity products)."""
    a = torch.randn(size, 1022, device=device)
    b = torch.randn(1022, size, device=device)
    a @ b
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size * 1022 * size / best / 1e9


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------- runs
def bench_scoring(
    model, n: int, m: int, device, precisions: list[str], baseline_captions: int, budget: int, seed: int = 0
) -> dict[str, Any]:
    images, ids, lens = make_batch(n, m, seed)
    t0 = time.perf_counter()
    img, cap = embed(model, images, ids, lens, device)
    sync(device)
    encode_s = time.perf_counter() - t0
    del images
    img_len = torch.full((n,), img.shape[1], dtype=torch.long, device=device)
    lens_d = lens.to(device)
    scale = model.pooling.scale().detach()
    pairs = n * m
    rows = []

    # the baseline on a subset of captions, extrapolated
    k = min(baseline_captions, m)
    subset = torch.randperm(m, generator=torch.Generator().manual_seed(1))[:k].sort().values
    with torch.no_grad():
        ds = [d.detach() for d in model.correspondence.matrices()]
        released_loop(img, cap[subset[:1].to(device)], lens[subset[:1]], ds, model.config.level_dims, scale)  # warm-up
        base_scores, base_s, base_mem = timed(
            lambda: released_loop(img, cap[subset.to(device)], lens[subset], ds, model.config.level_dims, scale), device
        )
    base_total = base_s / k * m
    rows.append(
        {
            "method": f"per-caption loop (released structure; {k} captions timed, x{m / k:.0f} extrapolated)",
            "seconds": base_total,
            "cpu_seconds": LAST_CPU_SECONDS[0] / k * m,
            "pairs_per_s": pairs / base_total,
            "speedup": 1.0,
            "max_rel_err": 0.0,
            "peak_mem_bytes": base_mem,
            "extrapolated": True,
        }
    )

    for precision in precisions:

        def run(precision: str = precision) -> torch.Tensor:
            with torch.no_grad():
                return model.score_prepared(
                    model.prepare_images(img),
                    img_len,
                    cap,
                    lens_d,
                    ScoringOptions(budget_bytes=budget, precision=precision),
                )

        if device.type == "cuda":  # compile / cuBLAS warm-up on a slice
            with torch.no_grad():
                model.score_prepared(
                    model.prepare_images(img[:64]),
                    img_len[:64],
                    cap[:64],
                    lens_d[:64],
                    ScoringOptions(budget_bytes=budget, precision=precision),
                )
        scores, secs, mem = timed(run, device)
        err = rel_err(scores[:, subset.to(device)], base_scores)
        rows.append(
            {
                "method": f"engine {precision}",
                "seconds": secs,
                "cpu_seconds": LAST_CPU_SECONDS[0],
                "pairs_per_s": pairs / secs,
                "speedup": base_total / secs,
                "max_rel_err": err,
                "peak_mem_bytes": mem,
                "extrapolated": False,
            }
        )
        del scores
    return {
        "images": n,
        "captions": m,
        "mean_caption_tokens": float(lens.float().mean()),
        "encode_seconds": encode_s,
        "rows": rows,
        "gemm_tflop": 2 * float(lens.sum()) * n * img.shape[1] * img.shape[2] / 1e12,
    }


def bench_training(model: ESLModel, device: torch.device, batch: int, precision: str, seed: int = 2) -> dict[str, Any]:
    images, ids, lens = make_batch(batch, batch, seed)
    images, ids = images.to(device), ids.to(device)
    model.train()
    diag = torch.eye(batch, dtype=torch.bool, device=device)

    def hinge(scores: torch.Tensor) -> torch.Tensor:
        pos = scores.diagonal()
        cost_c = (0.2 + scores - pos[:, None]).clamp(min=0).masked_fill(diag, 0)
        cost_i = (0.2 + scores - pos[None, :]).clamp(min=0).masked_fill(diag, 0)
        return cost_c.max(1).values.sum() + cost_i.max(0).values.sum()

    def engine_step() -> float:
        model.zero_grad(set_to_none=True)
        img = model.embed_images(images)
        cap = model.embed_captions(ids, lens)
        il = torch.full((batch,), img.shape[1], dtype=torch.long)
        s = model.score(img, il.to(device), cap, lens.to(device), ScoringOptions(precision=precision))
        loss = hinge(s)
        loss.backward()
        return float(loss.detach())

    def loop_step() -> float:
        model.zero_grad(set_to_none=True)
        img = model.embed_images(images)
        cap = model.embed_captions(ids, lens)
        s = released_loop(
            img, cap, lens, model.correspondence.matrices(), model.config.level_dims, model.pooling.scale()
        )
        loss = hinge(s)
        loss.backward()
        return float(loss.detach())

    out = {}
    # the engine: one warm-up step, median of two; the loop (tens of seconds): one step
    for name, step, reps in (("engine", engine_step, 2), ("per-caption loop", loop_step, 1)):
        if reps > 1:
            step()
        times, mems = [], []
        for _ in range(reps):
            loss, secs, mem = timed(step, device)
            cpu = LAST_CPU_SECONDS[0]
            times.append(secs)
            mems.append(mem)
        out[name] = {
            "seconds": statistics.median(times),
            "cpu_seconds": cpu,
            "loss": loss,
            "peak_mem_bytes": max((m for m in mems if m is not None), default=None),
        }
    grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    model.eval()
    return {
        "batch": batch,
        "precision": precision,
        "finite_grads": grads_ok,
        **out,
        "speedup": out["per-caption loop"]["seconds"] / out["engine"]["seconds"],
    }


# ---------------------------------------------------------------------------- output
def fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def _loads(values: list[float] | None) -> str:
    return "n/a" if values is None else ", ".join(f"{v:.2f}" for v in values)


def to_markdown(result: dict[str, Any]) -> str:
    mach = result["machine"]
    lines = [
        f"# Scoring engine benchmark ({mach['device']}{', quick' if result['quick'] else ''})",
        "",
        f"- machine: {mach['cpu']}, {mach['cpu_cores']} cores, torch {mach['torch']} "
        f"({mach['torch_threads']} threads), device {mach.get('gpu', mach['device'])}",
        f"- load average (1, 5, 15 min) at start: {_loads(mach['load_average'])}; "
        f"at end: {_loads(result['load_average_end'])}",
        f"- fp32 GEMM throughput (4096 x 1022 x 4096): {result['gemm_gflops']:.0f} GFLOP/s",
        f"- date: {mach['date']}",
        "",
    ]
    for s in result["scoring"]:
        floor = s["gemm_tflop"] * 1e3 / result["gemm_gflops"]
        lines += [
            f"## {s['images']} images x {s['captions']} captions "
            f"(mean {s['mean_caption_tokens']:.1f} tokens; affinity products {s['gemm_tflop']:.2f} TFLOP, "
            f"{floor:.0f} s at the measured GEMM rate)",
            "",
            "| method | seconds | process CPU s | pairs/s | vs baseline | max rel err vs baseline | peak memory |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s["rows"]:
            lines.append(
                f"| {r['method']} | {r['seconds']:,.1f}{' (extrap.)' if r['extrapolated'] else ''} | "
                f"{r['cpu_seconds']:,.1f} | {r['pairs_per_s']:,.0f} | {r['speedup']:.1f}x | {r['max_rel_err']:.1e} | {fmt_bytes(r['peak_mem_bytes'])} |"
            )
        lines.append("")
    t = result.get("training")
    if t:
        lines += [
            f"## One training step (batch {t['batch']}, {t['precision']}: encoders, score matrix with autograd, "
            "hinge loss, backward)",
            "",
            "| method | seconds | process CPU s | peak memory |",
            "|---|---:|---:|---:|",
            *(
                f"| {k} | {t[k]['seconds']:.2f} | {t[k]['cpu_seconds']:.2f} | {fmt_bytes(t[k]['peak_mem_bytes'])} |"
                for k in ("per-caption loop", "engine")
            ),
            "",
            f"Engine {t['speedup']:.1f}x faster; gradients finite: {t['finite_grads']}.",
            "",
        ]
    lines.append(
        "Peak memory: CUDA allocator peak above the start, or the growth of the process RSS "
        "high-water mark during the run (CPU; memory the allocator already held is not counted). "
        "Process CPU s: CPU time of all threads; wall time near CPU time / cores means the run "
        "had the cores to itself."
    )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, tf32, bf16 (default fp32)")
    p.add_argument("--baseline-captions", type=int, default=20, help="captions timed for the baseline (default 20)")
    p.add_argument("--budget-mb", type=float, default=DEFAULT_BUDGET_BYTES / 2**20, help="engine memory budget, MiB")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 1
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    budget = int(args.budget_mb * 2**20)
    if args.quick:
        shapes, train_batch, k = [(64, 320)], 32, min(args.baseline_captions, 10)
    else:
        shapes, train_batch, k = [(1000, 5000)], 128, args.baseline_captions
        if device.type == "cuda":
            shapes.append((5000, 25000))
    mach = machine(device)
    print(f"machine: {mach}", flush=True)
    gflops = gemm_throughput(device)
    print(f"fp32 GEMM: {gflops:.0f} GFLOP/s", flush=True)
    model = build_model(device)
    result: dict[str, Any] = {"machine": mach, "quick": args.quick, "gemm_gflops": gflops, "scoring": []}
    for n, m in shapes:
        print(f"scoring {n} x {m} ...", flush=True)
        s = bench_scoring(model, n, m, device, precisions, k, budget)
        result["scoring"].append(s)
        for r in s["rows"]:
            print(f"  {r['method']}: {r['seconds']:.1f} s, {r['speedup']:.1f}x, err {r['max_rel_err']:.1e}", flush=True)
    if not args.no_train:
        print(f"training step, batch {train_batch} ...", flush=True)
        result["training"] = bench_training(model, device, train_batch, precisions[0])
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    md = to_markdown(result)
    print(md)
    stem = f"scoring-{device.type}-{'-'.join(precisions)}{'-quick' if args.quick else ''}"
    write_atomic(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(args.out / f"{stem}.md", md)
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
