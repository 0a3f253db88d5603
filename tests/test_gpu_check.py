"""benchmarks/gpu_check.sh: its CPU dry run at tiny shapes exercises every part (engine in three
precisions, the compiled pooling, a bf16-configured training step, the encoders in fp32 and bf16)
and writes its results."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from _wait import HUNG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HUNG,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check-tiny.json").read_text())
    assert (tmp_path / "gpu-check-tiny.md").read_text().startswith("# GPU check (cpu)")
    rows = {r["method"]: r for r in result["scoring"][0]["rows"]}
    for precision in ("fp32", "tf32", "bf16"):
        for mode in ("auto", "always"):
            row = rows[f"engine {precision} compile={mode}"]
            assert row["max_rel_err"] <= (3e-2 if precision == "bf16" else 1e-5), row
            assert row["seconds"] > 0
    assert result["training"]["finite_grads"] and result["training"]["loss"] > 0
    encoders = {(r["encoder"].split(" ")[0], r["precision"]): r for r in result["encoders"]}
    assert set(encoders) == {(e, p) for e in ("CLIP", "EfficientNet-Lite0") for p in ("fp32", "bf16")}
    assert all(r["images_per_second"] > 0 for r in encoders.values())
    assert encoders["EfficientNet-Lite0", "bf16"]["min_cosine_to_fp32"] > 0.9
