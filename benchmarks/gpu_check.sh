#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): run it first on a machine with a GPU, as one call
# of at most 8 minutes. Writes benchmarks/results/gpu-check.{md,json}; commit them.
# Usage: bash benchmarks/gpu_check.sh [--tiny] [--device cpu]   (the test suite dry-runs it on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "gpu_check: no nvidia-smi"
exec timeout 480 python benchmarks/gpu_check.py "$@"
