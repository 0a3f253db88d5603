"""One entry point for loading any model eslmatch understands."""

from __future__ import annotations

from pathlib import Path

import torch

from .compat.official import load_official_checkpoint
from .errors import CheckpointError
from .model.esl import CONFIG_NAME, ESLModel


def model_format(path: str | Path) -> str:
    """``"eslmatch"`` for a directory written by save_pretrained, ``"released"`` for a file."""
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
) -> ESLModel:
    """Load our format (a directory) or a released ``.pth.tar`` (a file), in eval mode."""
    if model_format(path) == "eslmatch":
        model = ESLModel.from_pretrained(path, map_location=map_location)
        if text_model is not None:
            from .model.esl import _load_tokenizer

            model.tokenizer = _load_tokenizer(text_model, required=True)
        return model
    return load_official_checkpoint(path, map_location=map_location, text_model=text_model)
