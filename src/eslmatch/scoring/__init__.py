"""How a score is computed: the all-pairs engine, its tiles, the pooling in its three forms.

- :mod:`.options`: :class:`ScoringOptions` (budget, precision, workers, compile), passed
  explicitly; :class:`PoolingParams` (what the pooling needs from a model).
- :mod:`.tiles`: cutting ``N x M`` into caption chunks and image tiles within the budget.
- :mod:`.pooling`: the literal per-pair reference, the fused in-place form and the
  differentiable form of the bidirectional attention pooling.
- :mod:`.engine`: :func:`score_tiles` (and its distributed twin) running the tiles.

Models call the engine (``model.score(...)``); applications ask the model, never the engine.
"""

from .engine import score_tiles, score_tiles_distributed
from .options import DEFAULT_BUDGET_BYTES, PoolingParams, ScoringOptions
from .pooling import pool_pair, pool_tile, pool_tile_, t2i_attention
from .tiles import TilePlan, check_lengths, plan_tiles

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "PoolingParams",
    "ScoringOptions",
    "TilePlan",
    "check_lengths",
    "plan_tiles",
    "pool_pair",
    "pool_tile",
    "pool_tile_",
    "score_tiles",
    "score_tiles_distributed",
    "t2i_attention",
]
