"""ECCV Caption / CxC / COCO 5K metrics: eslmatch's vectorised code against the eccv-caption
package's own (``eccv_caption.Metrics.compute_all_metrics``) on the full 5,000 x 25,000 test split.

    python benchmarks/extended_eval.py                 # writes benchmarks/results/extended-eval-cpu.{md,json}
    python benchmarks/extended_eval.py --images 1000   # the first 1,000 images and their 5,000 captions

Two score matrices over the package's own ids (``coco_test_ids.npy``, images in the order their
captions come): random scores in which COCO, ECCV and CxC positives score higher (so no metric
is near 0 or 1), and the same rounded to one decimal (many ties, in the top places too). For
each, the package is given the rankings eslmatch ranks by (``np.argsort(row)[::-1]`` of the
float64 scores, its first 60 places: more than the 48 positives of the largest ECCV query), its
annotations restricted to the queries present when the matrix is a subset (it needs every
query ranked). Reported: the largest difference over the 18 values (9 metrics x 2 directions;
the acceptance bound is 1e-9), and the time of

- ours: :func:`eslmatch.annotations.extended.extended_metrics`, from the matrix (ranking included);
- theirs: the ranking (argsort of every row and every column) plus ``compute_all_metrics``.

Timings on a shared machine are indicative only; the figures are for a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import eslmatch.annotations.extended as ext
from eslmatch.evaluate import recall_metrics

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "coco_5k_recalls", "cxc_recalls")
PLACES = 60  # ranked places handed to the package (its largest ECCV query has 48 positives)
_ROWS = 256  # rows argsorted at once for the package's rankings


def subset_ids(n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_images`` test images (package order) and their ``5 n`` captions."""
    split = ext.coco_test_split()
    return split.image_ids[:n_images], split.caption_ids[: 5 * n_images]


def signal_matrix(image_ids: np.ndarray, caption_ids: np.ndarray, seed: int, decimals: int | None = None):
    """float32 ``(N, M)`` normal scores, COCO / ECCV / CxC positive pairs raised (by 1.0 to 3.0,
    0.75 to 2.25, 0.5 to 1.5), rounded to ``decimals`` when given (ties)."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((len(image_ids), len(caption_ids)), dtype=np.float32)
    for name, boost in (("coco", 2.0), ("eccv", 1.5), ("cxc", 1.0)):
        qs = ext.query_set(ext.load_positives(name).i2t, image_ids, caption_ids)
        local, col = np.divmod(qs.keys, len(caption_ids))
        sims[qs.queries[local], col] += (boost * (0.5 + rng.random(len(col)))).astype(np.float32)
    if decimals is not None:
        sims = np.round(sims, decimals)
    return sims


def package_rankings(sims: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray) -> tuple[dict, dict]:
    """``{image id: [caption ids]}`` and ``{caption id: [image ids]}``: the first places of
    ``np.argsort(row)[::-1]`` of the float64 scores, as eslmatch ranks."""
    i2t: dict[int, list[int]] = {}
    t2i: dict[int, list[int]] = {}
    for r0 in range(0, sims.shape[0], _ROWS):
        order = np.argsort(np.asarray(sims[r0 : r0 + _ROWS], dtype=np.float64), axis=1)[:, ::-1][:, :PLACES]
        for j, row in enumerate(order):
            i2t[int(image_ids[r0 + j])] = caption_ids[row].tolist()
    for c0 in range(0, sims.shape[1], _ROWS):
        cols = np.ascontiguousarray(np.asarray(sims[:, c0 : c0 + _ROWS], dtype=np.float64).T)
        order = np.argsort(cols, axis=1)[:, ::-1][:, :PLACES]
        for j, row in enumerate(order):
            t2i[int(caption_ids[c0 + j])] = image_ids[row].tolist()
    return i2t, t2i


def package_metrics(i2t: dict, t2i: dict, targets: tuple[str, ...] = TARGETS) -> dict[str, Any]:
    """``eccv_caption.Metrics.compute_all_metrics`` on these rankings, its annotations restricted
    to the queries ranked (all of them on the full split)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson"
        import eccv_caption

        metric = eccv_caption.Metrics()
    present = {"i2t": set(i2t), "t2i": set(t2i)}
    for attr in ("coco_gts", "cxc_gts", "eccv_gts"):
        gts = getattr(metric, attr)
        setattr(metric, attr, {side: {k: v for k, v in gts[side].items() if k in present[side]} for side in gts})
    out = metric.compute_all_metrics(i2t, t2i, target_metrics=targets, Ks=(1, 5, 10), verbose=False)
    return {key: {side: float(v) for side, v in value.items()} for key, value in out.items()}


def compare(sims: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray) -> dict[str, Any]:
    """Both implementations on one matrix: values, the largest difference, timings."""
    t0 = time.perf_counter()
    ours = ext.extended_metrics(sims, image_ids, caption_ids)["extended"]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    i2t, t2i = package_rankings(sims, image_ids, caption_ids)
    t_rank = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = package_metrics(i2t, t2i)
    t_package = time.perf_counter() - t0
    diff = max(abs(ours[k][s] - theirs[k][s]) for k in theirs for s in ("i2t", "t2i"))
    standard = recall_metrics(sims)  # COCO 5K R@K is the standard protocol's, on the same ranking
    diff_standard = max(
        abs(ours[f"coco_5k_r{k}"][s] - standard[s][f"r{k}"] / 100) for k in (1, 5, 10) for s in ("i2t", "t2i")
    )
    return {
        "max_abs_difference": diff,
        "max_abs_difference_to_standard_protocol": diff_standard,
        "metrics_ours": ours,
        "metrics_package": theirs,
        "seconds": {
            "ours": round(t_ours, 3),
            "package_ranking": round(t_rank, 3),
            "package_metrics": round(t_package, 3),
            "package_total": round(t_rank + t_package, 3),
        },
    }


def machine() -> dict[str, Any]:
    import eslmatch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "eslmatch": eslmatch.__version__,
        "annotations": f"eccv-caption {ext.package_version()}",
        "platform": platform.platform(),
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# ECCV Caption / CxC / COCO 5K metrics: eslmatch vs eccv-caption",
        "",
        f"{payload['images']} images x {payload['captions']} captions, ids from the package's files; "
        f"seed {payload['seed']}; machine: {payload['machine']['cpu_count']} CPUs, load "
        f"{payload['machine']['load_average_1_5_15']} (timings on a busy machine are indicative only).",
        "",
        "| matrix | max abs difference (18 values) | COCO 5K vs standard protocol | ours (s) "
        "| package: ranking + metrics (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in payload["matrices"].items():
        t = r["seconds"]
        lines.append(
            f"| {name} | {r['max_abs_difference']:.1e} | {r['max_abs_difference_to_standard_protocol']:.1e} "
            f"| {t['ours']:.2f} | {t['package_ranking']:.2f} + {t['package_metrics']:.2f} = {t['package_total']:.2f} |"
        )
    first = next(iter(payload["matrices"].values()))["metrics_ours"]
    lines += ["", "Values (ours, first matrix; the package's agree to the difference above):", ""]
    lines += ["| metric | i2t | t2i |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['i2t']:.6f} | {v['t2i']:.6f} |" for k, v in first.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000, help="first N test images, 5N captions (default 5000: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the matrices (default 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (default benchmarks/results)")
    p.add_argument("--name", default="extended-eval-cpu", help="file name stem (default extended-eval-cpu)")
    args = p.parse_args(argv)
    image_ids, caption_ids = subset_ids(args.images)
    payload: dict[str, Any] = {
        "images": len(image_ids),
        "captions": len(caption_ids),
        "seed": args.seed,
        "machine": machine(),
        "matrices": {},
    }
    for name, decimals in (("random with positives raised", None), ("the same rounded to 1 decimal (ties)", 1)):
        sims = signal_matrix(image_ids, caption_ids, args.seed, decimals)
        payload["matrices"][name] = compare(sims, image_ids, caption_ids)
        r = payload["matrices"][name]
        print(f"{name}: max |ours - package| = {r['max_abs_difference']:.1e}; seconds {r['seconds']}")
        del sims
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", markdown(payload))):
        path = args.out / f"{args.name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(f"wrote {args.out / args.name}.md and .json")
    worst = max(r["max_abs_difference"] for r in payload["matrices"].values())
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
