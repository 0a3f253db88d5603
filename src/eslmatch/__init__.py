"""eslmatch: image-text matching with ESL (Enhanced Semantic Similarity Learning)."""

__version__ = "0.2.0"

from .compat import load_official_checkpoint
from .config import ESLConfig
from .errors import CheckpointError, EslmatchError, InputError
from .factory import ESLModel, VSEModel, build_model, load_model, load_pretrained
from .scoring import ScoringOptions


# The galleries' entry points (an application) are imported on first use: ``import eslmatch``
# stays light and the core never imports an application at import time.
def __getattr__(name: str) -> object:
    if name == "open_gallery":
        from .retrieval import open_gallery

        return open_gallery
    if name == "build_gallery":
        from .retrieval import build_gallery

        return build_gallery
    raise AttributeError(f"module 'eslmatch' has no attribute {name!r}")


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
