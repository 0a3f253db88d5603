"""One resumable chunk store for the jobs that write many rows (``extract``, ``embed``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_save_npy, atomic_write_text


class ChunkStore:
    """A resumable job's partial folder: ``chunk_XXXXX.npy`` (float32 rows ``(n_kept, ...)``:
    region features for ``extract``, vectors for ``embed``) with its ``chunk_XXXXX.json`` (which
    of the chunk's items gave a row, which were skipped and why), plus ``progress.json`` holding
    the fingerprint every chunk of the folder was made with.

    Each chunk is two files of its own (the record written after the features), so several
    processes can fill one store, each writing whole chunks.
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], parent_name: str | None = None) -> None:
        self.folder = folder
        self.parent_name = parent_name  # a parent folder of several stores, removed when left empty
        self.fingerprint = fingerprint
        self.chunks: dict[int, dict[str, Any]] = {}
        self.discarded = False

    @property
    def progress_path(self) -> Path:
        return self.folder / "progress.json"

    def chunk_path(self, index: int) -> Path:
        return self.folder / f"chunk_{index:05d}.npy"

    def record_path(self, index: int) -> Path:
        return self.folder / f"chunk_{index:05d}.json"

    def _valid(self, index: int, rec: Any, tail: tuple[int, ...] | None) -> bool:
        """``rec`` is a chunk record whose array file is complete (``(len(kept), *tail)``
        float32; ``tail`` ``None``: any width)."""
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("kept"), list)
            or not isinstance(rec.get("skipped"), list)
        ):
            return False
        try:
            arr = np.load(self.chunk_path(index), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return False
        if arr.dtype != np.float32 or arr.ndim < 1 or arr.shape[0] != len(rec["kept"]):
            return False
        return tail is None or tuple(arr.shape[1:]) == tuple(tail)

    def _read_record(self, index: int) -> Any:
        try:
            return json.loads(self.record_path(index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def open(self, tail: tuple[int, ...] | None = None) -> None:
        """Load the chunks of an earlier run when its fingerprint matches; else start clean.
        Writes ``progress.json`` (the fingerprint) for this run."""
        found: dict[int, Any] = {}
        if self.progress_path.is_file():
            try:
                data = json.loads(self.progress_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if not isinstance(data, dict):
                data = {}
            legacy: dict[str, Any] = data["chunks"] if isinstance(data.get("chunks"), dict) else {}
            records = sorted(self.folder.glob("chunk_*.json"))
            if data.get("fingerprint") == self.fingerprint:
                found.update((int(k), v) for k, v in legacy.items())  # stores of earlier versions
                for path in records:
                    try:
                        index = int(path.stem.split("_")[1])
                    except (IndexError, ValueError):
                        continue
                    found[index] = self._read_record(index)
            elif legacy or records:
                self.discarded = True
        self.chunks = {i: rec for i, rec in sorted(found.items()) if self._valid(i, rec, tail)}
        if not self.chunks:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for index, rec in self.chunks.items():
            if not self.record_path(index).is_file():
                atomic_write_text(self.record_path(index), json.dumps(rec))
        atomic_write_text(self.progress_path, json.dumps({"fingerprint": self.fingerprint}))

    def attached(self) -> bool:
        """This process sees the ``progress.json`` of this fingerprint (written by whoever
        opened the store: the folder is shared)."""
        try:
            data = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("fingerprint") == self.fingerprint

    def save(self, index: int, features: np.ndarray, kept: list[int], skipped: list[tuple[str, str]]) -> None:
        """Write chunk ``index``: its array ``(len(kept), ...)``, then its record."""
        atomic_save_npy(self.chunk_path(index), features)
        rec = {"kept": kept, "skipped": [list(s) for s in skipped]}
        atomic_write_text(self.record_path(index), json.dumps(rec))
        self.chunks[index] = rec

    def collect(self, indices: Sequence[int], tail: tuple[int, ...] | None, wait_seconds: float = 30.0) -> list[int]:
        """Load the records of ``indices`` written by other processes; returns those still
        missing after ``wait_seconds`` (files of another node may take a moment to show)."""
        deadline = time.monotonic() + wait_seconds
        while True:
            for index in indices:
                if index not in self.chunks:
                    rec = self._read_record(index)
                    if self._valid(index, rec, tail):
                        self.chunks[index] = rec
            missing = [i for i in indices if i not in self.chunks]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.5)

    def load(self, index: int) -> np.ndarray:
        return np.load(self.chunk_path(index), mmap_mode="r", allow_pickle=False)

    def remove(self) -> None:
        """Delete the folder (and its parent named ``parent_name``, when left empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.name == self.parent_name and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
