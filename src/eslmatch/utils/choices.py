"""Names that arguments and configs accept, importable without torch: the CLI checks them
before it imports or loads anything heavy (``tests/test_startup.py`` keeps them equal to the
modules that act on them)."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16")  # eslmatch.utils.precision
RUNTIMES = ("torch", "onnxruntime")  # eslmatch.retrieval.encode
COMPOSITIONAL_PROTOCOLS = ("sugarcrepe", "winoground")  # eslmatch.annotations.compositional
