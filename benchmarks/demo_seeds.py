"""The demo over several seeds in fp32 and in bf16 (``--precision``), one run after another on
this machine: ESL's and VSE's rsum, truth P@1, hard-case R@1, training time per epoch and the
whole run's time; mean and minimum over the seeds.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --precisions fp32 auto --work /tmp/demo-seeds
    # writes benchmarks/results/demo-seeds-cpu.{json,md}; each run's report stays under --work

A single demo run is one draw: its dataset, initialisation and batches follow the seed, and
truth P@1 moves by several points from one seed (or machine) to another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = ("rsum", "truth_p1", "hard_r1", "epoch_s")


def run_one(work: Path, seed: int, precision: str) -> dict[str, Any]:
    out = work / f"{precision}-seed{seed}"
    report = out / "report"
    cmd = [sys.executable, "-m", "eslmatch.cli", "demo", "--out", str(report), "--cache", str(work / "cache")]
    cmd += ["--seed", str(seed), "--precision", precision, "--no-progress"]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    m = json.loads((report / "metrics.json").read_text())
    epochs = m["settings"]["epochs"]
    models = {
        name: {
            "rsum": r["test"]["rsum"],
            "truth_p1": r["truth"]["t2i"]["p1"],
            "hard_r1": 100 * r["hard_cases"]["r1"],
            "epoch_s": r["train_seconds"] / epochs,
        }
        for name, r in m["models"].items()
    }
    return {"seed": seed, "precision": m["settings"]["precision"], "asked": precision, "wall_s": wall, "models": models}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for asked in dict.fromkeys(r["asked"] for r in runs):
        group = [r for r in runs if r["asked"] == asked]
        out[asked] = {
            "resolved": group[0]["precision"],
            "wall_s": {"mean": statistics.mean(r["wall_s"] for r in group)},
        }
        for name in group[0]["models"]:
            out[asked][name] = {
                f: {
                    "mean": statistics.mean(r["models"][name][f] for r in group),
                    "min": min(r["models"][name][f] for r in group),
                }
                for f in FIGURES
            }
    return out


def to_markdown(summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Demo defaults, seeds {', '.join(map(str, seeds))}, one run after another on {os.cpu_count()} cores; "
        "mean (minimum) over the seeds; epoch: training seconds / epochs (validation included)",
        "",
        "| precision | model | rsum | truth t2i P@1 | hard-case R@1 | s / epoch | demo wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for asked, s in summary.items():
        for name in ("ESL", "VSE"):
            f = s[name]
            lines.append(
                f"| {asked} ({s['resolved']}) | {name} | {f['rsum']['mean']:.1f} ({f['rsum']['min']:.1f}) | "
                f"{f['truth_p1']['mean']:.1f} ({f['truth_p1']['min']:.1f}) | "
                f"{f['hard_r1']['mean']:.1f} ({f['hard_r1']['min']:.1f}) | {f['epoch_s']['mean']:.1f} | "
                f"{s['wall_s']['mean']:.0f} |"
            )
    lines += ["", "Each run:", "", "| precision | seed | ESL rsum | ESL P@1 | VSE rsum | VSE P@1 | wall s |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        e, v = r["models"]["ESL"], r["models"]["VSE"]
        lines.append(
            f"| {r['asked']} | {r['seed']} | {e['rsum']:.1f} | {e['truth_p1']:.1f} | {v['rsum']:.1f} | "
            f"{v['truth_p1']:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    ap.add_argument("--work", type=Path, default=Path("demo-seeds"))
    ap.add_argument("--out", type=Path, default=RESULTS / "demo-seeds-cpu")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for precision in args.precisions:
            runs.append(run_one(args.work, seed, precision))
            print(json.dumps(runs[-1]), flush=True)
            (args.work / "runs.json").write_text(json.dumps(runs, indent=2))
    summary = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(summary, runs) + "\n")
    print(to_markdown(summary, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
