"""Compatibility with the authors' released ESL checkpoints."""

from .official import load_official_checkpoint, read_checkpoint

__all__ = ["load_official_checkpoint", "read_checkpoint"]
