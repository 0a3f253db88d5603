"""The run log: ``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars; rank 0 only."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = output / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Records past the resumed step come from the interrupted run: drop them.
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _record_step(line) <= resume_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; writing metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=resume_step)

    def record(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, **values}, sort_keys=True) + "\n")
        self.file.flush()

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0
