"""Scores from a file of inputs (``eslmatch score MODEL --inputs FILE.npz``), computed here so
that a Python caller gets the same matrix: :func:`read_score_inputs` reads the arrays,
:func:`caption_inputs` turns the captions (token ids or strings) into what a model takes,
:func:`score_inputs` scores them and :func:`relative_error` compares with a reference array.

The ``.npz``: region models: ``images`` ``(N, R, D)`` region features, ``captions`` ``(M, W)``
token ids, ``cap_lens`` ``(M,)``, optional ``image_lengths`` ``(N,)``. Models that take pixels
(ESL-CLIP): ``images`` ``(N, 3, H, W)`` preprocessed pixels, ``captions`` ``(M, 77)`` token ids
(``cap_lens`` optional: the end token marks the length). ``captions`` may instead be a string
array ``(M,)``, tokenised by the model.

Not exported by :mod:`eslmatch.scoring` (it asks a model, which the engine's package never
imports).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import EslmatchError

if TYPE_CHECKING:
    from ..model.base import MatchingModel

REQUIRED = ("images", "captions")


def read_score_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an inputs ``.npz`` by name; refused in one line when the file is missing,
    unreadable (pickles are never loaded) or lacks ``images`` / ``captions``."""
    path = Path(path)
    if not path.is_file():
        raise EslmatchError(f"{path}: no such inputs file" if not path.exists() else f"{path}: not a file")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("an .npy array, not an .npz archive")
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise EslmatchError(f"{path}: cannot read inputs ({_first_line(exc)})") from exc
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise EslmatchError(f"{path}: missing array(s) {', '.join(missing)} (need images and captions)")
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def caption_inputs(
    model: MatchingModel, arrays: Mapping[str, np.ndarray], path: str | Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (M, W), lengths (M,))`` from token ids (+ ``cap_lens``) or from strings
    (``path``: the inputs file, named in errors)."""
    caps = arrays["captions"]
    if caps.dtype.kind in "US":
        return model.tokenize([str(c) for c in caps.reshape(-1)])
    ids = torch.from_numpy(np.asarray(caps)).long()
    if "cap_lens" in arrays:
        return ids, torch.from_numpy(np.asarray(arrays["cap_lens"])).long()
    if model.inputs != "pixels":
        raise EslmatchError(f"{Path(path)}: missing array cap_lens (token ids of a region model need their lengths)")
    # CLIP-style ids: zeros after the end token, so the length is the count up to the last non-zero
    nonzero = (ids != 0).long()
    return ids, (nonzero.shape[1] - nonzero.flip(1).argmax(1)).clamp(min=1)


def score_inputs(
    model: MatchingModel, arrays: Mapping[str, np.ndarray], path: str | Path, device: str | torch.device = "cpu"
) -> np.ndarray:
    """The scores ``(N, M)`` of the images against the captions of :func:`read_score_inputs`'
    ``arrays`` (read from ``path``), computed on ``device``."""
    images = torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32))
    img_len = torch.from_numpy(np.asarray(arrays["image_lengths"])).long() if "image_lengths" in arrays else None
    captions, cap_len = caption_inputs(model, arrays, path)
    with torch.no_grad():
        return model.similarity(images.to(device), img_len, captions.to(device), cap_len).cpu().numpy()


def relative_error(scores: np.ndarray, arrays: Mapping[str, np.ndarray], name: str, path: str | Path) -> float:
    """``max |scores - reference| / max |reference|`` against the array ``name`` of the inputs
    (read from ``path``); refused when there is no such array or its shape differs."""
    if name not in arrays:
        raise EslmatchError(f"{Path(path)}: no array {name!r} to compare with")
    ref = np.asarray(arrays[name], dtype=np.float64)
    if ref.shape != scores.shape:
        raise EslmatchError(f"{name} has shape {ref.shape}, scores have {scores.shape}")
    return float(np.abs(scores - ref).max() / max(np.abs(ref).max(), 1e-30))
