"""The model families on one base, one module per concept of the paper.

Concepts: :mod:`.encoders` (regions, BERT/GRU text), :mod:`.aggregation` (the level
stacks), :mod:`.correspondence` (weighted level correspondence), :mod:`.pooling` (its
temperature; the pooling math is in :mod:`eslmatch.scoring`). Families: :mod:`.esl`,
:mod:`.vse`; :mod:`.base` holds what they share. :mod:`eslmatch.factory` names them.
"""

from .aggregation import LevelStack
from .base import MatchingModel, RegionTextModel, load_state_strict
from .correspondence import Correspondence
from .encoders import BertTextEncoder, GRUTextEncoder, RegionEncoder
from .pooling import AttentionPooling

__all__ = [
    "AttentionPooling",
    "BertTextEncoder",
    "Correspondence",
    "GRUTextEncoder",
    "LevelStack",
    "MatchingModel",
    "RegionEncoder",
    "RegionTextModel",
    "load_state_strict",
]
