"""Engine settings as data, passed explicitly to every scoring call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from ..errors import InputError

DEFAULT_BUDGET_BYTES = 1 << 30
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class ScoringOptions:
    """How the all-pairs engine runs (never what it computes, up to ``precision``).

    Attributes:
        budget_bytes: bound on one tile's working set (the ``(N, M)`` result, the inputs
            and, with autograd, the tensors saved for backward come on top).
        precision: ``"fp32"`` (default; equal to the reference within 1e-5 relative),
            ``"tf32"`` (CUDA tensor cores; fp32 on CPU) or ``"bf16"`` products (~1e-2).
        workers: CPU threads without autograd, each scoring whole tiles single-threaded
            (``None``: ``torch.get_num_threads()``; 1: one stream of multi-threaded ops).
        compile: ``"auto"`` compiles the pooling with ``torch.compile`` on CUDA only,
            ``"always"`` on any device, ``"never"`` not at all.
        tile_elements: preferred affinity elements per tile (``None``: per-device default).
    """

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    precision: str = "fp32"
    workers: int | None = None
    compile: str = "auto"
    tile_elements: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 1:
            raise InputError(f"budget_bytes must be a positive integer, got {self.budget_bytes!r}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers must be >= 1 or None, got {self.workers}")

    def replace(self, **changes: object) -> ScoringOptions:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class PoolingParams(NamedTuple):
    """What the pooling needs from a model: softmax scale ``s``, leaky slope, l2 epsilon."""

    scale: Tensor | float
    slope: float = 0.1
    eps: float = 1e-8
