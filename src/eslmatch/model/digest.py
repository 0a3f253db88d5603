"""A model folder's own record of its weights: ``digest.json`` beside ``model.safetensors``.

``save_pretrained`` writes ``{"algorithm": "sha256", "files": {"model.safetensors": {"sha256",
"bytes"}}}``; every load compares the weights with it (through the size + mtime cache of
:mod:`eslmatch.utils.digest`, so a second load costs a ``stat``), so a file damaged after it
was written (bytes overwritten in place, a bad copy) is refused instead of scoring garbage.
Folders written before the record existed have none and load as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..utils import atomic_write_text
from ..utils.digest import file_digest, remember, sha256_stream

DIGEST_NAME = "digest.json"
WEIGHTS_NAME = "model.safetensors"


def write_digest(directory: Path, names: tuple[str, ...] = (WEIGHTS_NAME,)) -> dict[str, str]:
    """Hash the weight files just written into ``directory`` and record them; ``{name: sha256}``."""
    files: dict[str, Any] = {}
    for name in names:
        path = directory / name
        digest = sha256_stream(path)
        remember(path, digest)  # the next load needs no second read
        files[name] = {"sha256": digest, "bytes": path.stat().st_size}
    atomic_write_text(directory / DIGEST_NAME, json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    return {n: f["sha256"] for n, f in files.items()}


def recorded_digest(directory: Path) -> dict[str, str] | None:
    """``{name: sha256}`` from the folder's ``digest.json``; ``None`` when it has none."""
    path = directory / DIGEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {str(n): str(f["sha256"]) for n, f in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable weights digest ({type(exc).__name__})") from exc
    return files


def verify_weights(directory: Path, use_cache: bool = True) -> tuple[str, bool]:
    """``(sha256 of model.safetensors, whether the folder recorded one)``; a
    :class:`CheckpointError` naming both digests when they differ. ``use_cache=False`` reads
    every byte (``eslmatch info --verify``)."""
    weights = directory / WEIGHTS_NAME
    try:
        actual = file_digest(weights, use_cache=use_cache)
    except OSError as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc.strerror or exc})") from exc
    recorded = recorded_digest(directory)
    if recorded is None or WEIGHTS_NAME not in recorded:
        return actual, False
    if recorded[WEIGHTS_NAME] != actual:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:16]}... differs from the {recorded[WEIGHTS_NAME][:16]}... recorded in "
            f"{DIGEST_NAME} when it was written (damaged or modified): restore or rewrite the model"
        )
    return actual, True
