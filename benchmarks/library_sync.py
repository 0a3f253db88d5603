"""``eslmatch index sync`` on a large photo library: how long a sync with nothing changed takes,
and a sync with 1% of the photos changed, against the encoding of those photos alone.

    python benchmarks/library_sync.py --photos 100000      # writes benchmarks/results/library-sync-cpu.{json,md}

A library of ``--photos`` small PNGs (16 x 16, random pixels) in 100 folders under two roots is
indexed with a tiny random ESL-CLIP (what matters here is the bookkeeping, not the model). Each
sync runs as a user runs it: ``python -m eslmatch.cli index sync --json`` in a new process
(wall time, the process's peak memory from ``getrusage``); the in-process time the sync itself
reports is recorded beside it. Then 1% of the photos are overwritten and synced, and the same
photos are encoded alone (``Gallery`` encoder over the same files) to separate encoding from
the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))


def photo(path: Path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_library(base: Path, n: int) -> list[Path]:
    roots = [base / "a", base / "b"]
    for i in range(n):
        folder = roots[i % 2] / f"d{(i // 2) % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(folder / f"img{i:06d}.png", i)
    return roots


# the process's own peak: VmHWM (getrusage's ru_maxrss keeps the parent's peak across fork + exec on Linux)
RUN_CLI = (
    "import sys\n"
    "from eslmatch.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "print('MAXRSS_KIB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def cli_sync(index: Path) -> dict[str, Any]:
    """One ``eslmatch index sync --json`` in a new process: wall s, its report, its own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "index", "sync", "--index", str(index), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KIB"))
    report = json.loads(proc.stdout)
    return {
        "wall_s": round(wall, 2),
        "sync_s": report["seconds"],
        "report": report,
        "peak_rss_mib": round(peak / 1024, 1),
    }


def main() -> None:
    from _models import TINY_CLIP
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
    from eslmatch.retrieval import BuildOptions, build_gallery
    from eslmatch.utils.precision import cpu_capabilities

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/eslmatch-library-sync")
    ap.add_argument("--out", default=str(RESULTS / "library-sync-cpu"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    roots = make_library(work / "lib", args.photos)
    made = time.perf_counter() - t0
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(num_levels=2, clip={**TINY_CLIP, "image_size": 16, "patch_size": 8})).eval()
    model.save_pretrained(work / "model")
    t0 = time.perf_counter()
    build_gallery(model, roots, work / "G", options=BuildOptions(progress=False), model_path=work / "model")
    built = time.perf_counter() - t0
    record: dict[str, Any] = {
        "photos": args.photos,
        "library_written_s": round(made, 1),
        "build_s": round(built, 1),
        "cpu": cpu_capabilities(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    # loading the gallery's model in a new process (a sync that encodes pays it; one that does not, not)
    probe = (
        f"import time; from eslmatch.retrieval import open_gallery; g = open_gallery({str(work / 'G')!r}); "
        "t = time.perf_counter(); g.model; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    record["model_load_new_process_s"] = round(float(out.strip().splitlines()[-1]), 2)
    record["unchanged"] = cli_sync(work / "G")  # the first sync also warms the file cache
    record["unchanged_again"] = cli_sync(work / "G")
    files = sorted(p for r in roots for p in r.rglob("*.png"))
    changed = files[::100][: args.photos // 100]
    for j, f in enumerate(changed):
        photo(f, 10_000_000 + j)
    record["changed_1pct"] = cli_sync(work / "G")
    # the same photos indexed alone (a gallery of just them): what a sync of them cannot do without
    alone = work / "changed"
    alone.mkdir()
    for j, f in enumerate(changed):
        shutil.copy(f, alone / f"c{j:06d}.png")
    t0 = time.perf_counter()
    build_gallery(model, alone, work / "alone", options=BuildOptions(progress=False), model_path=work / "model")
    record["encode_changed_alone_s"] = round(time.perf_counter() - t0, 2)
    record["encoded_alone"] = len(changed)
    record["changed_overhead_s"] = round(record["changed_1pct"]["sync_s"] - record["encode_changed_alone_s"], 2)
    record["changed_overhead_without_model_load_s"] = round(
        record["changed_overhead_s"] - record["model_load_new_process_s"], 2
    )
    record["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    cpu = record["cpu"]
    md = [
        f"# index sync on a library of {args.photos:,} photos",
        "",
        f"CPU: {cpu.get('cpu_name')} ({cpu.get('capability')}), {os.cpu_count()} cores; torch {torch.__version__}. "
        f"Written by `python benchmarks/library_sync.py --photos {args.photos}`.",
        "",
        "| sync | items changed | wall (new process) | sync itself | peak memory |",
        "|---|---|---|---|---|",
    ]
    for name in ("unchanged", "unchanged_again", "changed_1pct"):
        r = record[name]
        n = r["report"]["changed"] + r["report"]["new"] + r["report"]["moved"] + r["report"]["gone"]
        md.append(f"| {name} | {n} | {r['wall_s']} s | {r['sync_s']} s | {r['peak_rss_mib']} MiB |")
    md += [
        "",
        f"Indexing the {len(changed)} changed photos alone: {record['encode_changed_alone_s']} s; the 1% sync's "
        f"time beyond that: {record['changed_overhead_s']} s, of which loading the model in the new process "
        f"{record['model_load_new_process_s']} s (torch's import among it), "
        f"the rest {record['changed_overhead_without_model_load_s']} s. A sync that encodes nothing never loads "
        f"the model. Build of the whole library: {record['build_s']} s. 'sync itself' is the time the command "
        "reports (after the gallery is opened); 'wall' adds Python's start and imports (torch among them).",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
