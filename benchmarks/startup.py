"""Wall time of ``eslmatch`` calls as a user runs them (``--help``, a bad argument, searches): a new process each, with
``PYTHONDONTWRITEBYTECODE=1`` (as Docker images and CI set it), warm file cache, side by side
for this tree and, with ``--before REV``, an earlier commit (checked out in a temporary git
worktree and put first on ``PYTHONPATH``; same interpreter, same installed packages).

    python benchmarks/startup.py --index REGION_GALLERY --index CLIP_GALLERY --before 975a850
    # writes benchmarks/results/startup-cpu.{json,md}

Calls timed (median of ``--runs`` after one warm-up): ``--help``, an unknown argument, one
text query (``-k 3``) on each ``--index`` (one per model family), and on the first an empty
query, ``-k 0`` and a missing index. Each tree is timed twice: with the installed packages'
bytecode, and with none found (an empty ``PYTHONPYCACHEPREFIX``), which is what ``pip install
--no-compile`` leaves: every call then compiles torch's and transformers' modules from source,
as ``PYTHONDONTWRITEBYTECODE=1`` forbids caching them. eslmatch's own modules (an editable
install: no bytecode in a fresh clone) are compiled on every call in all variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUERY = "a red circle left of a blue square"


def family(index: str) -> str:
    """The model family a gallery records (``esl``, ``vse``, ``esl-clip``)."""
    manifest = json.loads((Path(index) / "manifest.json").read_text())
    return str((manifest.get("model", {}).get("config") or {}).get("model_type") or "?")


def calls(indexes: list[str]) -> dict[str, list[str]]:
    """``--help``, a bad argument, one query per gallery, and the first gallery's refusals."""
    first = indexes[0]
    out = {"--help": ["--help"], "a bad argument": ["search", "--index", first, "dog", "--bogus"]}
    out.update({f"one query ({family(i)} gallery)": ["search", "--index", i, QUERY, "-k", "3"] for i in indexes})
    out.update(
        {
            "empty query": ["search", "--index", first, ""],
            "-k 0": ["search", "--index", first, "dog", "-k", "0"],
            "missing index": ["search", "--index", str(Path(first).parent / "no-such-index"), "dog"],
        }
    )
    return out


def wall(args: list[str], env: dict[str, str], runs: int) -> dict[str, float | int]:
    """Median and max wall seconds of ``python -m eslmatch.cli ARGS`` over ``runs`` (after a warm-up)."""
    cmd = [sys.executable, "-m", "eslmatch.cli", *args]
    code = subprocess.run(cmd, env=env, capture_output=True, check=False).returncode
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "exit": code}


def compiled(package: str) -> bool:
    """True when the installed ``package`` has cached bytecode for its ``__init__``."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return False
    return Path(importlib.util.cache_from_source(spec.origin)).is_file()


def measure(src: Path, indexes: list[str], runs: int, extra: dict[str, str]) -> dict[str, dict[str, float | int]]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", **extra}
    return {name: wall(args, env, runs) for name, args in calls(indexes).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--index", required=True, action="append", help="a gallery to search (repeat: one of each model family)"
    )
    ap.add_argument("--before", metavar="REV", help="also time this commit, side by side")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "startup-cpu")
    args = ap.parse_args()
    # an empty bytecode cache prefix: no installed .pyc is found, as after `pip install --no-compile`
    no_pyc = {"PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="eslmatch-no-pyc-")}
    variants: dict[str, tuple[Path, dict[str, str]]] = {}
    tmp = None
    if args.before:
        tmp = Path(tempfile.mkdtemp(prefix="eslmatch-before-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp), args.before], check=True)
        variants[f"before ({args.before}), no installed bytecode"] = (tmp / "src", no_pyc)
        variants[f"before ({args.before})"] = (tmp / "src", {})
    variants["this tree, no installed bytecode"] = (ROOT / "src", no_pyc)
    variants["this tree"] = (ROOT / "src", {})
    try:
        results = {name: measure(src, args.index, args.runs, extra) for name, (src, extra) in variants.items()}
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp)], check=False)
    record = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "PYTHONDONTWRITEBYTECODE": "1",
        "bytecode_installed": {p: compiled(p) for p in ("torch", "transformers", "numpy")},
        "indexes": {i: family(i) for i in args.index},
        "runs": args.runs,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    names = list(results)
    lines = [
        f"`eslmatch` wall time, new process each call, PYTHONDONTWRITEBYTECODE=1, median of {args.runs} "
        f"(max), {os.cpu_count()} cores; installed bytecode: {record['bytecode_installed']}",
        "",
        "| call | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for call in calls(args.index):
        cells = [f"{results[n][call]['median_s']:.2f} s ({results[n][call]['max_s']:.2f})" for n in names]
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
