"""eslmatch: image-text matching with ESL (Enhanced Semantic Similarity Learning)."""

__version__ = "0.1.0"

from .compat import load_official_checkpoint
from .config import ESLConfig
from .errors import CheckpointError, EslmatchError, InputError
from .model import ESLModel

__all__ = [
    "CheckpointError",
    "ESLConfig",
    "ESLModel",
    "EslmatchError",
    "InputError",
    "__version__",
    "load_official_checkpoint",
]
