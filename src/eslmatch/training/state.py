"""Where a run stands (:class:`TrainState`), RNG states, and the resumable state file.

The state file holds only tensors, numbers, strings, lists and dicts: it is written
atomically with ``torch.save`` and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from ..errors import CheckpointError
from ..utils import atomic_file

STATE_NAME = "training_state.pt"
STATE_FORMAT = "eslmatch-train-state"
STATE_VERSION = 1


class StateRecord(TypedDict):
    """A :class:`TrainState` as the state file stores it (``history`` as JSON text)."""

    epoch: int
    step_in_epoch: int
    global_step: int
    best_rsum: float | None
    history: str
    epoch_loss: float
    epoch_batches: int


class PythonRng(TypedDict):
    version: int
    state: torch.Tensor
    gauss: float | None


class NumpyRng(TypedDict):
    key: torch.Tensor
    pos: int
    has_gauss: int
    gauss: float


class RngState(TypedDict):
    """Python, numpy, torch and CUDA generator states as plain tensors and numbers."""

    python: PythonRng
    numpy: NumpyRng
    torch: torch.Tensor
    cuda: list[torch.Tensor]


@dataclass
class TrainState:
    """The position of a run: everything but weights, optimiser and RNGs.

    Attributes:
        epoch: the current epoch (0-based); ``step_in_epoch`` batches of it are done.
        global_step: optimiser steps so far.
        best_rsum: best validation rsum so far (``None`` before the first validation).
        epoch_loss, epoch_batches: summed logged loss of the current epoch and its batches.
        history: one record per finished epoch (train loss, validation recalls, rsum).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_rsum: float | None = None
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_record(self) -> StateRecord:
        """The fields as the state file stores them (history as JSON text)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_rsum": self.best_rsum,
            "history": json.dumps(self.history),
            "epoch_loss": self.epoch_loss if self.step_in_epoch else 0.0,
            "epoch_batches": self.epoch_batches if self.step_in_epoch else 0,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainState:
        """A :class:`TrainState` from a loaded state file (its :class:`StateRecord` fields, checked here)."""
        return cls(
            epoch=int(record["epoch"]),
            step_in_epoch=int(record["step_in_epoch"]),
            global_step=int(record["global_step"]),
            best_rsum=record["best_rsum"],
            epoch_loss=float(record["epoch_loss"]),
            epoch_batches=int(record["epoch_batches"]),
            history=json.loads(record.get("history", "[]")),
        )

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss, self.epoch_batches = 0.0, 0


def rng_state() -> RngState:
    """Python, numpy, torch and CUDA generator states as plain tensors and numbers."""
    py = random.getstate()
    np_state: Any = np.random.get_state()
    return {
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: RngState) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def save_state_file(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    with atomic_file(path, "wb") as fh:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, fh)


def load_state_file(path: Path) -> dict[str, Any]:
    """Read a training state written by :func:`save_state_file` (``weights_only=True``)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and truncated files alike
        raise CheckpointError(f"{path}: unreadable training state ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an eslmatch training state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('version')} is not {STATE_VERSION}")
    return state
