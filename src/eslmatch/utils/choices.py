"""Names that arguments and configs accept, importable without torch: the CLI checks them
before it imports or loads anything heavy (``tests/test_startup.py`` keeps them equal to the
modules that act on them)."""

from __future__ import annotations

from ..errors import EslmatchError

PRECISIONS = ("auto", "fp32", "bf16")  # eslmatch.utils.precision
RUNTIMES = ("torch", "onnxruntime")  # eslmatch.retrieval.encode (queries)
MEASURED_RUNTIMES = ("auto", *RUNTIMES)  # eslmatch.export.runtime: auto = measured (extraction)
COMPOSITIONAL_PROTOCOLS = ("sugarcrepe", "winoground")  # eslmatch.annotations.compositional
RECALL_PROTOCOLS = ("f30k", "coco1k", "coco5k")  # eslmatch.evaluate.PROTOCOLS


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of ``auto``, ``fp32``, ``bf16``; else one clear error."""
    if precision not in PRECISIONS:
        raise EslmatchError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    return precision


def check_runtime(runtime: str, allowed: tuple[str, ...] = RUNTIMES) -> str:
    """``runtime`` when it is one of ``allowed``; else one clear error."""
    if runtime not in allowed:
        raise EslmatchError(f"runtime {runtime!r}: choose from {', '.join(allowed)}")
    return runtime
