"""ESL-CLIP, the authors' CLIP-based ESL: one folder, one line in :mod:`eslmatch.factory`."""

from .config import ClipArchitecture, ESLClipConfig
from .measure import WeightedMeasuring, measuring_degrees
from .model import ESLClipModel
from .preprocess import ClipPreprocess
from .tokenizer import ClipTokenizer

__all__ = [
    "ClipArchitecture",
    "ClipPreprocess",
    "ClipTokenizer",
    "ESLClipConfig",
    "ESLClipModel",
    "WeightedMeasuring",
    "measuring_degrees",
]
