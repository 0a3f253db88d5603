"""ESL-CLIP speed on this machine: CLIP ViT-B/16 encoding, and exhaustive scoring of
5,000 images x 25,000 captions against the branch's own scoring structure, side by side.

The CLIP-based branch scores a test set in shards of 100 images x 100 captions
(``trainer.py``, ``_valid_epoch_step``): for every shard pair it runs the whole model, so the
CLIP towers re-encode the shard's images and captions and the ESL head (levels and the
weighted measuring, 9 levels of ``X_l @ D_l @ Y_l^T``) runs on the pair. eslmatch encodes
every image and caption once and scores by one inner product of index vectors (exact).
Random weights (ViT-B/16, 224 px, text 12 layers): speed does not depend on the values.

    python benchmarks/esl_clip.py --out benchmarks/results/esl-clip-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    out = None
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


def branch_head_shard(model: ESLClipModel, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """The branch's head on one shard, in its structure: level stacks on both sides, then nine
    ``X_l @ D_l @ Y_l^T`` products summed and averaged (``sims_claculator.get_sims_levels``)."""
    x = model.image_levels(img / img.norm(dim=1, keepdim=True))
    y = model.text_levels(txt / txt.norm(dim=1, keepdim=True))
    dims = model.config.level_dims
    xs, ys = torch.split(x, dims, -1), torch.split(y, dims, -1)
    total = 0
    for xl, d, yl in zip(xs, model.measuring.matrices(), ys):
        total = total + xl @ d @ yl.transpose(0, 1)
    return total / len(dims)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=25000)
    p.add_argument("--encode-batch", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig()).eval()  # ViT-B/16 + 12-layer text, 224 px
    n, m = args.images, args.captions
    result: dict = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "images": n,
        "captions": m,
    }
    with torch.no_grad():
        pixels = torch.randn(args.encode_batch, 3, 224, 224)
        model.embed_images(pixels[:2])  # warm-up
        s, _ = timed(lambda: model.embed_images(pixels), repeat=2)
        result["image_encode_per_s"] = args.encode_batch / s
        ids, lens = model.tokenize(["a man riding a wave on top of a surfboard"] * 64)
        model.embed_captions(ids[:2], lens[:2])
        s, _ = timed(lambda: model.embed_captions(ids[:, :16], lens), repeat=2)
        result["caption_encode_per_s"] = 64 / s
        # scoring from cached features: ours (one product) vs the branch's shard structure (head only)
        img_raw = torch.randn(n, model.config.embed_size)
        txt_raw = torch.randn(m, model.config.embed_size)
        s_levels, (img_emb, cap_emb) = timed(
            lambda: (
                model.image_levels(img_raw / img_raw.norm(dim=1, keepdim=True)),
                model.text_levels(txt_raw / txt_raw.norm(dim=1, keepdim=True)),
            )
        )
        s_ours, scores = timed(lambda: model.score(img_emb, None, cap_emb, None))
        shard = 100
        shards_img, shards_cap = (n + shard - 1) // shard, (m + shard - 1) // shard
        timed_pairs = 40
        s_pairs, ref = timed(
            lambda: [
                branch_head_shard(model, img_raw[:shard], txt_raw[j * shard : (j + 1) * shard])
                for j in range(timed_pairs)
            ]
        )
        s_branch_head = s_pairs / timed_pairs * shards_img * shards_cap
        err = float(
            (scores[:shard, : timed_pairs * shard] - torch.cat(ref, 1)).abs().max() / torch.cat(ref, 1).abs().max()
        )
    per_pair_encode = shard / result["image_encode_per_s"] + shard / result["caption_encode_per_s"]
    result.update(
        {
            "ours_levels_seconds": s_levels,
            "ours_scoring_seconds": s_ours,
            "ours_total_scoring_seconds": s_levels + s_ours,
            "branch_head_seconds_extrapolated": s_branch_head,
            "branch_shard_pairs": shards_img * shards_cap,
            "branch_pairs_timed": timed_pairs,
            "speedup_scoring_from_features": s_branch_head / (s_levels + s_ours),
            "max_rel_err_vs_branch_structure": err,
            "encode_once_seconds": n / result["image_encode_per_s"] + m / result["caption_encode_per_s"],
            "branch_reencode_seconds_extrapolated": per_pair_encode * shards_img * shards_cap,
        }
    )
    result["speedup_end_to_end"] = (result["branch_reencode_seconds_extrapolated"] + s_branch_head) / (
        result["encode_once_seconds"] + s_levels + s_ours
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
