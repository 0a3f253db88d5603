"""The GPU check: everything a session lent a GPU should measure, in one run (<= 8 minutes).

1. The scoring engine in fp32 / tf32 / bf16 against the released code's per-caption
   structure at 1,000 x 5,000 and 5,000 x 25,000 (E=512, L=8, R=36): scores compared with the
   released structure on a subset of captions, time and peak memory of each.
2. The ``torch.compile`` pooling path (``compile="always"``) against the plain one.
3. One bf16 training step of batch 128 through the public ``Trainer`` (autocast on CUDA).
4. The encoders' images/s in fp32 and bf16 (autocast; EfficientNet channels-last): CLIP
   ViT-B/16 image tower (random weights, 224 px, batch 64) and EfficientNet-Lite0 features
   (224 px, batch 128), with the bf16 outputs' minimum cosine to fp32 per image.

Results: ``benchmarks/results/gpu-check.{md,json}`` (``--out`` elsewhere). ``--tiny`` runs
every part at small shapes (the test suite does so on CPU, so the script cannot fail for a
trivial reason on the day a GPU is there).

    bash benchmarks/gpu_check.sh            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu-dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import build_model, embed, make_batch, rel_err, released_loop, timed  # noqa: E402

from eslmatch.scoring import ScoringOptions  # noqa: E402
from eslmatch.training import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def check_scoring(model: Any, device: torch.device, n: int, m: int, subset: int, precisions: list[str]) -> dict:
    images, ids, lens = make_batch(n, m, seed=1)
    img, cap = embed(model, images, ids, lens, device)
    lens_d = lens.to(device)
    img_len = torch.full((n,), img.shape[1], dtype=torch.long, device=device)
    with torch.no_grad():
        ds = [d.detach() for d in model.correspondence.matrices()]
        scale = model.pooling.scale().detach()
        ref, ref_s, ref_mem = timed(
            lambda: released_loop(img, cap[:subset], lens[:subset], ds, model.config.level_dims, scale), device
        )
    rows: list[dict[str, Any]] = [
        {
            "method": f"released structure ({subset} captions, x{m / subset:.0f} extrapolated)",
            "seconds": ref_s * m / subset,
            "peak_mem_bytes": ref_mem,
        }
    ]
    for precision in precisions:
        for compile_mode in ("auto", "always"):
            opts = ScoringOptions(precision=precision, compile=compile_mode)

            def run(opts: ScoringOptions = opts) -> torch.Tensor:
                with torch.no_grad():
                    return model.score(img, img_len, cap, lens_d, opts)

            run()  # warm-up (compilation, cuBLAS)
            scores, secs, mem = timed(run, device)
            rows.append(
                {
                    "method": f"engine {precision} compile={compile_mode}",
                    "seconds": secs,
                    "peak_mem_bytes": mem,
                    "max_rel_err": rel_err(scores[:, :subset], ref),
                    "speedup": ref_s * m / subset / secs,
                }
            )
            del scores
    return {"images": n, "captions": m, "rows": rows}


def check_training(model: Any, device: torch.device, batch: int) -> dict:
    images, ids, lens = make_batch(batch, batch, seed=2)
    model.train()
    trainer = Trainer(model, TrainConfig(bf16=True, region_drop=0.0, word_mask=0.0, device=str(device)))
    trainer.start_epoch(1)
    img_len = torch.full((batch,), images.shape[1], dtype=torch.long)
    trainer.step(images, img_len, ids, lens)  # warm-up
    loss, secs, mem = timed(lambda: trainer.step(images, img_len, ids, lens), device)
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    model.eval()
    return {
        "batch": batch,
        "bf16_autocast": trainer.bf16,
        "seconds": secs,
        "peak_mem_bytes": mem,
        "loss": float(loss),
        "finite_grads": finite,
    }


def check_encoders(device: torch.device, tiny: bool) -> list[dict]:
    """Images/s of the CLIP image tower and EfficientNet-Lite0 in fp32 and bf16 on ``device``."""
    from eslmatch.extract import BackboneOptions, build_backbone
    from eslmatch.model.esl_clip.config import ClipArchitecture
    from eslmatch.model.esl_clip.towers import VisionTransformer
    from eslmatch.utils.precision import encode_in

    if tiny:
        vit = ClipArchitecture(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2)
        clip_batch, clip_size, lite_batch, lite_size = 4, 32, 4, 64
    else:
        vit = ClipArchitecture()  # ViT-B/16
        clip_batch, clip_size, lite_batch, lite_size = 64, 224, 128, 224
    torch.manual_seed(0)
    tower = VisionTransformer(vit).eval().to(device)
    pixels = torch.randn(clip_batch, 3, clip_size, clip_size, device=device)
    images = torch.rand(lite_batch, 3, lite_size, lite_size, device=device) * 2 - 1
    lite = {
        p: build_backbone("efficientnet-lite0", BackboneOptions(image_size=lite_size, device=str(device), precision=p))
        for p in ("fp32", "bf16")
    }
    rows = []
    for name, batch, run in (
        (f"CLIP {'tiny' if tiny else 'ViT-B/16'} image tower ({clip_size} px)", clip_batch,
         lambda p: encode_in(p, device, lambda: tower(pixels))),
        (f"EfficientNet-Lite0 features ({lite_size} px)", lite_batch, lambda p: lite[p](images)),
    ):  # fmt: skip
        outs = {}
        for precision in ("fp32", "bf16"):
            with torch.inference_mode():
                run(precision)  # warm-up (cuDNN autotuning, oneDNN primitives)
                out, secs, _ = timed(lambda p=precision: run(p), device)  # noqa: B023
            outs[precision] = out.reshape(batch, -1).float()
            rows.append({"encoder": name, "precision": precision, "batch": batch, "images_per_second": batch / secs})
        cos = torch.nn.functional.cosine_similarity(outs["fp32"], outs["bf16"], dim=1)
        rows[-1]["min_cosine_to_fp32"] = float(cos.min())
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"# GPU check ({result['device']})", "", f"Machine: {result['machine']}", ""]
    for block in result["scoring"]:
        lines += [
            f"## Scoring {block['images']} x {block['captions']}",
            "",
            "| method | seconds | speedup | max rel err | peak memory (MiB) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in block["rows"]:
            mem = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
            speed = f"{r['speedup']:.1f}x" if "speedup" in r else ""
            err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
            lines.append(f"| {r['method']} | {r['seconds']:.3f} | {speed} | {err} | {mem} |")
        lines.append("")
    t = result["training"]
    mem = "n/a" if t["peak_mem_bytes"] is None else f"{t['peak_mem_bytes'] / 2**20:.0f} MiB"
    lines += [
        "## One training step",
        "",
        f"batch {t['batch']}, bf16 autocast {t['bf16_autocast']}: {t['seconds']:.3f} s, loss {t['loss']:.4f}, "
        f"finite gradients {t['finite_grads']}, peak memory {mem}",
        "",
    ]
    lines += [
        "## Encoders",
        "",
        "| encoder | precision | batch | images/s | min cosine to fp32 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in result.get("encoders", []):
        cos = f"{r['min_cosine_to_fp32']:.5f}" if "min_cosine_to_fp32" in r else ""
        lines.append(f"| {r['encoder']} | {r['precision']} | {r['batch']} | {r['images_per_second']:.1f} | {cos} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes: a dry run of every part")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = build_model(device)
    shapes = [(20, 100, 10)] if args.tiny else [(1000, 5000, 50), (5000, 25000, 25)]
    precisions = ["fp32", "tf32", "bf16"]
    result = {
        "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "scoring": [check_scoring(model, device, n, m, s, precisions) for n, m, s in shapes],
        "training": check_training(model, device, 8 if args.tiny else 128),
        "encoders": check_encoders(device, args.tiny),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu-check-tiny" if args.tiny else "gpu-check"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
