"""Which model a gallery belongs to: its record in the manifest, its fingerprint, the checks.

A gallery's model decides what it stores (see ``docs/retrieval.md``): a two-stage model (ESL:
``exact_index`` False) gets engine-ready image sides plus first-stage vectors, a one-stage
model (VSE, ESL-CLIP: ``exact_index`` True) only its index vectors. ``model.inputs`` says
whether images are region features or pixels (photos).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from .layout import GalleryIndexError
from .records import ModelRecord

if TYPE_CHECKING:  # each check takes a model: torch is loaded by then, not by importing this
    from ..model.base import MatchingModel


def model_kind(model: MatchingModel) -> str:
    """The model's ``model_type`` (its class name when it has none), for messages."""
    return str(model.config.model_type or type(model).__name__)


def stages_of(model: MatchingModel) -> int:
    """1 for a model whose index vectors' inner product IS the score, else 2 (shortlist + re-rank)."""
    return 1 if model.exact_index else 2


def check_gallery_model(model: MatchingModel) -> MatchingModel:
    """Refuse a model a gallery cannot serve (two-stage galleries need region features)."""
    from ..model.base import MatchingModel, takes_pixels

    if not isinstance(model, MatchingModel):
        raise EslmatchError(f"a gallery needs an eslmatch model (a MatchingModel), not {type(model).__name__}")
    if not model.exact_index and takes_pixels(model):
        raise EslmatchError(
            f"two-stage galleries need a model of region features; this one ({model_kind(model)}) takes pixels"
        )
    return model


def model_record(model: MatchingModel, model_path: str | Path | None, text_model: str | Path | None) -> ModelRecord:
    """What a gallery's manifest records of its model (``path`` lets a search load it)."""
    from ..model.identity import model_fingerprint

    c = model.config
    record: ModelRecord = {
        "path": None if model_path is None else str(Path(model_path).resolve()),
        "text_model": None if text_model is None else str(text_model),
        "fingerprint": model_fingerprint(model),
        "weights": model.weights_digest,
        "config": {
            key: getattr(c, key, None)
            for key in ("model_type", "strategy", "embed_size", "kernel_size", "num_levels", "img_dim", "text_encoder")
        },
        "stages": stages_of(model),
        "inputs": model.inputs,
    }
    return record


def check_model(record: ModelRecord, stages: int, model: MatchingModel, where: str) -> None:
    """Refuse a model other than the one a gallery was built with, naming both."""
    from ..model.identity import model_fingerprint

    check_gallery_model(model)
    if stages_of(model) != stages:
        built = "a single-vector model (one-stage)" if stages == 1 else "an ESL model (two-stage)"
        raise GalleryIndexError(
            f"{where}: built by {built}, the given model is {model_kind(model)} (a different model)"
        )
    check_weights(record, model, where)
    given = model_fingerprint(model)
    if given != record.get("fingerprint"):
        path = record.get("path") or "path not recorded"
        kind = (record.get("config") or {}).get("model_type") or "?"
        raise GalleryIndexError(
            f"{where}: built with another model ({kind} at {path}, fingerprint {str(record.get('fingerprint'))[:12]}) "
            f"than the given {model_kind(model)} model (fingerprint {given[:12]}): its weights or config differ; "
            "use that model or rebuild the gallery"
        )


def check_weights(record: ModelRecord, model: MatchingModel, where: str) -> None:
    """Refuse weights whose file digest differs from the one the gallery recorded, naming
    both. The fingerprint samples values; this covers every byte. Files of different formats
    (a released checkpoint and its conversion) hold the same weights in other bytes: only the
    fingerprint compares those. Galleries built before digests were recorded have none."""
    recorded, given = record.get("weights"), model.weights_digest
    if not isinstance(recorded, dict) or not isinstance(given, dict) or recorded.get("format") != given.get("format"):
        return
    if recorded.get("sha256") != given.get("sha256"):
        raise GalleryIndexError(
            f"{where}: the model's weight file has sha256 {str(given.get('sha256'))[:16]}..., the gallery was built "
            f"with {str(recorded.get('sha256'))[:16]}... (recorded model: {record.get('path') or 'path not recorded'}): "
            "the file was damaged or replaced; restore it or rebuild the gallery"
        )
