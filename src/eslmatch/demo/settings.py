"""The demo's settings, importable without torch: ``eslmatch demo --help`` and its argument
checks show these defaults before the pipeline (torch, the models) is imported."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.io import default_cache_dir

DATASET_VERSION = 3  # 2: the test PNGs are kept, relative paths; 3: {split}_truth.json


@dataclass
class DemoSettings:
    """Sizes and training budget of the demo (defaults fit 10 minutes on 2 CPU cores)."""

    n_train: int = 1500
    n_dev: int = 200
    n_test: int = 1000
    seed: int = 0
    image_size: int = 128  # rendered scenes
    feature_size: int = 192  # the extractor's input: a 6 x 6 grid of regions, ~21 px each
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    text_lr_factor: float = 0.5  # MiniLM's trained layers learn at lr * this
    embed_size: int = 256
    num_levels: int = 4
    strategy: str = "adaptive"
    # Hinge summed over all negatives for this many epochs, hardest negatives after (the
    # released recipe's warm-up). With false negatives masked, the hardest negative is a real
    # one: switching after 1 epoch took truth P@1 from 35% to 45% (no warm-up collapses).
    warmup_epochs: int = 1
    global_loss_weight: float = 0.1  # ESL's auxiliary first-stage loss (two-stage search)
    text_train_layers: int = 3  # MiniLM's top layers fine-tuned, the lower ones frozen and cached
    mask_true_pairs: bool = True  # the training truth: a pair it calls true is never a negative
    region_drop: float = 0.2
    # fp32, bf16 or auto (bf16 where the CPU / GPU computes it natively): the feature extractor,
    # training's forward pass (autocast, fp32 master weights), evaluation's and the index's
    # encoders; the scores stay float32. Resolved by the pipeline before the dataset key is made.
    # auto: over 3 seeds bf16 gave the fp32 figures (ESL truth P@1 54.1 vs 52.7) in 0.57x the
    # time on an AVX512-BF16 CPU (docs/demo.md); fp32 reproduces the earlier figures exactly.
    precision: str = "auto"
    # What runs the feature extractor on CPU: auto = ONNX Runtime where it is faster and agrees
    # with float32 eager (measured once per machine; 5x on a 2-core AVX2 EPYC), or torch /
    # onnxruntime. `--precision fp32 --runtime torch` is the reference path.
    runtime: str = "auto"
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    out_dir: Path = Path("demo_report")
    progress: bool = True

    def dataset_key(self) -> str:
        """Names the cached dataset: everything that changes its files."""
        parts: list[object] = [DATASET_VERSION, self.n_train, self.n_dev, self.n_test, self.seed, self.image_size]
        parts.append(self.feature_size)
        if self.precision != "fp32":  # bf16 features are other files; fp32 keeps its earlier key
            parts.append(self.precision)
        if self.runtime != "torch":  # so are another runtime's (auto: what this machine measured)
            parts.append(self.runtime)
        key = json.dumps(parts)
        return hashlib.sha256(key.encode()).hexdigest()[:12]
