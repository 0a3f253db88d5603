"""eslmatch: image-text matching with ESL (Enhanced Semantic Similarity Learning).

The public names below are imported on first use (:mod:`eslmatch.utils.lazy`): ``import
eslmatch`` and the command line's argument checks do not import torch, and the core never
imports an application (the galleries) at import time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CheckpointError, EslmatchError, InputError
from .utils.lazy import lazy_attributes

__version__ = "0.2.0"

if TYPE_CHECKING:
    from .compat import load_official_checkpoint
    from .config import ESLConfig
    from .factory import ESLModel, VSEModel, build_model, load_model, load_pretrained
    from .retrieval import build_gallery, open_gallery
    from .scoring import ScoringOptions

__getattr__ = lazy_attributes(
    __name__,
    {
        "load_official_checkpoint": ".compat",
        "ESLConfig": ".config",
        **dict.fromkeys(("ESLModel", "VSEModel", "build_model", "load_model", "load_pretrained"), ".factory"),
        "ScoringOptions": ".scoring",
        "build_gallery": ".retrieval",
        "open_gallery": ".retrieval",
    },
)

__all__ = [
    "CheckpointError",
    "ESLConfig",
    "ESLModel",
    "EslmatchError",
    "InputError",
    "ScoringOptions",
    "VSEModel",
    "__version__",
    "build_gallery",
    "build_model",
    "load_model",
    "load_official_checkpoint",
    "load_pretrained",
    "open_gallery",
]
