"""The ESL model, one module per concept of the paper."""

from .aggregation import LevelStack
from .correspondence import Correspondence
from .encoders import BertTextEncoder, GRUTextEncoder, RegionEncoder
from .esl import ESLModel
from .pooling import AttentionPooling
from .vse import VSEModel, build_model, load_pretrained

__all__ = [
    "AttentionPooling",
    "BertTextEncoder",
    "Correspondence",
    "ESLModel",
    "GRUTextEncoder",
    "LevelStack",
    "RegionEncoder",
    "VSEModel",
    "build_model",
    "load_pretrained",
]
