"""How a gallery's encoders run (:class:`Encoding`), what it records of it, and what encoding
gives (:class:`Encoded`): plain data, importable without torch (``encode.py`` runs them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EslmatchError
from ..utils.choices import check_precision

if TYPE_CHECKING:
    import torch

    from ..export.onnx import OnnxEncoders


@dataclass(frozen=True)
class Encoding:
    """How the encoders run.

    Attributes:
        precision: ``"fp32"`` or ``"bf16"`` (resolved, see :func:`resolve_encoding`); under
            ONNX Runtime the export's variant, ``"fp32"`` or ``"int8"``.
        onnx: the model's exported encoders (:class:`~eslmatch.export.onnx.OnnxEncoders`) to
            run instead of PyTorch, or ``None``.
    """

    precision: str = "fp32"
    onnx: OnnxEncoders | None = field(default=None, compare=False)

    @property
    def runtime(self) -> str:
        return "torch" if self.onnx is None else "onnxruntime"

    def record(self) -> dict[str, str]:
        """What a gallery records: ``{"runtime": ..., "precision": ...}``."""
        return {"runtime": self.runtime, "precision": self.precision}

    def __str__(self) -> str:
        return self.precision if self.onnx is None else f"onnxruntime {self.precision}"


FP32 = Encoding()


def resolve_encoding(precision: str | None, device: torch.device | str, onnx: OnnxEncoders | None = None) -> Encoding:
    """An :class:`Encoding`: ``precision`` (``auto``, ``fp32``, ``bf16``; ``None``: fp32)
    resolved for ``device``; with ``onnx`` (an ``OnnxEncoders``) its variant instead."""
    if onnx is not None:
        if precision not in (None, "auto", "fp32"):
            raise EslmatchError(
                f"--precision {precision} applies to the PyTorch encoders; ONNX Runtime runs the export's "
                f"{onnx.variant} graphs"
            )
        return Encoding(str(onnx.variant), onnx)
    from ..utils.precision import resolve_precision

    return Encoding(resolve_precision(check_precision(precision or "fp32"), device))


def recorded_encoding(record: Mapping[str, str] | None) -> dict[str, str]:
    """The encoding a gallery (or one of its sources) records (``record``: its ``encoding``
    entry, ``None`` where there is none); galleries written before it was recorded were
    encoded in PyTorch fp32."""
    if isinstance(record, dict) and record.get("precision"):
        return {"runtime": str(record.get("runtime", "torch")), "precision": str(record["precision"])}
    return {"runtime": "torch", "precision": "fp32"}


def default_encoding(record: Mapping[str, str] | None, device: torch.device | str) -> Encoding:
    """What queries are encoded in unless told: the gallery's recorded PyTorch precision (fp32
    for a gallery encoded under ONNX Runtime, whose export a searcher is not told)."""
    rec = recorded_encoding(record)
    if rec["runtime"] == "torch" and rec["precision"] in ("fp32", "bf16"):
        return Encoding(rec["precision"])
    return FP32


def describe_encoding(rec: Mapping[str, str]) -> str:
    """``bf16``, ``fp32``, ``onnxruntime fp32``: a recorded encoding in words."""
    return rec["precision"] if rec["runtime"] == "torch" else f"{rec['runtime']} {rec['precision']}"


@dataclass
class Encoded:
    """Encoded items of a source.

    Attributes:
        positions: the items' positions in the source (photos that could not be read are absent).
        vectors: ``(B, K)`` float32 first-stage / index vectors.
        side: ``(B, W, Dt)`` float32 engine-ready sides, zero beyond each length (two-stage).
        lengths: ``(B,)`` int64 real regions / words (two-stage).
        skipped: ``(name, reason)`` of files left out.
    """

    positions: list[int]
    vectors: np.ndarray
    side: np.ndarray | None = None
    lengths: np.ndarray | None = None
    skipped: list[tuple[str, str]] | None = None
