"""The one place that names the concrete model families.

A family is a :class:`~eslmatch.model.base.MatchingModel` subclass in its own module (or
folder) under :mod:`eslmatch.model`, registered here by one line of :data:`FAMILIES`;
everything else (training, evaluation, retrieval, the CLI) works through the base protocol
and these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from .compat.official import load_official_checkpoint
from .config import ESLConfig
from .errors import CheckpointError, EslmatchError
from .model.base import CONFIG_NAME, MatchingModel, read_config
from .model.esl import ESLModel
from .model.esl_clip import ESLClipModel
from .model.esl_clip.config import ESLClipConfig
from .model.vse import VSEModel
from .text import load_tokenizer

if TYPE_CHECKING:
    from .text import TextTokenizer

FAMILIES: dict[str, type[MatchingModel]] = {
    "esl": ESLModel,
    "vse": VSEModel,
    "esl-clip": ESLClipModel,
}
# The configuration of one of the families.
ModelConfig: TypeAlias = ESLConfig | ESLClipConfig


def model_class(model_type: str) -> type[MatchingModel]:
    """The class of a ``model_type`` (``"esl"``, ``"vse"``, ...)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise EslmatchError(f"unknown model_type {model_type!r}; known: {', '.join(FAMILIES)}") from None


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The configuration of the family ``data["model_type"]`` names (``"esl"`` when absent)."""
    return model_class(str(data.get("model_type", "esl"))).config_class.from_dict(data)


def config_class(model_type: str) -> type:
    """The configuration dataclass of a family."""
    return model_class(model_type).config_class


def build_model(config: ModelConfig, tokenizer: TextTokenizer | None = None) -> MatchingModel:
    """A new model of ``config.model_type`` (pretrained backbones load from the config's names)."""
    return model_class(config.model_type).from_config(config, tokenizer)  # type: ignore[attr-defined]


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> MatchingModel:
    """Load a folder written by ``save_pretrained`` as the family its ``config.json`` names."""
    model_type = read_config(Path(directory)).get("model_type", "esl")
    return model_class(str(model_type)).from_pretrained(directory, map_location=map_location)


def model_format(path: str | Path) -> str:
    """``"eslmatch"`` for a folder written by save_pretrained, ``"released"`` for a file."""
    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return "eslmatch"
        raise CheckpointError(f"{p}: a directory without {CONFIG_NAME} is not an eslmatch model")
    if p.is_file():
        return "released"
    raise CheckpointError(f"{p}: no such file or directory")


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", text_model: str | Path | None = None
) -> MatchingModel:
    """Load our format (a folder) or a released checkpoint (a file), in eval mode.

    Args:
        text_model: a tokenizer to use for raw text (released files store none; for our
            folders it replaces the saved one).
    """
    if model_format(path) == "eslmatch":
        model = load_pretrained(path, map_location=map_location)
        if text_model is not None:
            model.tokenizer = load_tokenizer(text_model, required=True)
        return model
    return load_official_checkpoint(path, map_location=map_location, text_model=text_model)


def load_recorded(
    record: dict[str, Any],
    model: str | Path | None = None,
    text_model: str | Path | None = None,
    device: str | torch.device = "cpu",
    what: str = "the index",
) -> MatchingModel:
    """The one loader from a manifest's model record (a gallery's, a features folder's) to a
    model with its tokenizer: ``model`` when given, else the recorded ``path``; the text
    model (the tokenizer of a released checkpoint) given, else recorded. Used by search,
    serve, the index operations and evaluation alike, so none can forget a part."""
    path = model or record.get("path")
    if not path:
        raise EslmatchError(f"{what} records no model path: pass --model")
    if model is None and not Path(path).exists():
        raise EslmatchError(f"{what}'s model {path} no longer exists: pass --model")
    return load_model(path, map_location=device, text_model=text_model or record.get("text_model"))
