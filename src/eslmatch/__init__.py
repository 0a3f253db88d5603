"""eslmatch: image-text matching with ESL (Enhanced Semantic Similarity Learning)."""

__version__ = "0.2.0"

from .compat import load_official_checkpoint
from .config import ESLConfig
from .errors import CheckpointError, EslmatchError, InputError
from .factory import ESLModel, VSEModel, build_model, load_model, load_pretrained
from .scoring import ScoringOptions

__all__ = [
    "CheckpointError",
    "ESLConfig",
    "ESLModel",
    "EslmatchError",
    "InputError",
    "ScoringOptions",
    "VSEModel",
    "__version__",
    "build_model",
    "load_model",
    "load_official_checkpoint",
    "load_pretrained",
]
