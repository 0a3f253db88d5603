"""``--runtime auto``: the fastest implementation of an encoder on this machine that agrees with
float32 eager PyTorch, measured once and cached.

For an encoder (a torch module of fixed-size inputs, e.g. an extraction backbone) the
candidates are the torch path(s) the caller offers (float32 eager, and bf16 autocast where the
precision allows it) and ONNX Runtime float32 on a graph exported from the same module. Each
runs a calibration batch; one whose per-item cosine with float32 eager is below
:data:`MIN_COSINE` is not faithful and never chosen; the fastest faithful one is.

The choice is cached under ``<cache>/runtimes/<name>-<key>/`` (``choice.json`` and, for ONNX
Runtime, ``graph.onnx``; each written atomically). The key covers what the choice depends on:
the encoder's identity (its ``facts``: weights' sha256, input size, ...), torch's and ONNX
Runtime's versions and the CPU (name and capability). A cache entry that cannot be read, or
whose graph's sha256 is not the one recorded, is measured again, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import EslmatchError
from ..utils.digest import sha256_stream
from ..utils.io import atomic_write_text
from ..utils.precision import cpu_capabilities
from .onnx import ort_session, require_onnx

# A fact of an encoder's identity (a backbone's fingerprint, also in ``extract_meta.json``):
# JSON scalars and its grid.
FactValue = Union[str, int, float, bool, list[int], None]
Facts = dict[str, FactValue]
# What a measured choice depends on besides the encoder (library versions, threads, the CPU).
MachineFacts = dict[str, str | int | bool | None]

MIN_COSINE = 0.999  # per item, against float32 eager PyTorch on the calibration batch
CHOICE = "choice.json"
GRAPH = "graph.onnx"
VERSION = 1


class KeyBody(TypedDict):
    """What the cache key is the hash of."""

    version: int
    name: str
    facts: Facts
    machine: MachineFacts


class ChoiceRecord(TypedDict, total=False):
    """``choice.json``: the key's body, the choice and its measurements (empty for a choice
    that was not measured; one read back is checked before use)."""

    version: int
    name: str
    facts: Facts
    machine: MachineFacts
    key: str
    runtime: str
    precision: str
    items_per_second: dict[str, float]
    min_cosine: dict[str, float]
    bound: float
    calibration: list[int]
    measured: str
    graph_sha256: str


@dataclass
class RuntimeChoice:
    """What runs an encoder: ``runtime`` (``torch`` or ``onnxruntime``), the torch
    ``precision`` (``fp32`` / ``bf16``; ONNX Runtime runs float32), the ORT ``session`` and
    the ``record`` that ``choice.json`` holds (speeds, cosines, the key's facts)."""

    runtime: str
    precision: str = "fp32"
    session: Any = None
    record: ChoiceRecord = field(default_factory=ChoiceRecord)

    def run(self, x: Tensor) -> Tensor:
        """The ONNX Runtime output of ``x`` (a float32 batch) as a tensor."""
        (out,) = self.session.run(None, {"x": x.detach().float().cpu().numpy()})
        return torch.from_numpy(out)


def onnxruntime_available() -> bool:
    try:
        require_onnx()
    except EslmatchError:
        return False
    return True


def machine_facts() -> MachineFacts:
    """What a measured choice depends on besides the encoder: library versions and the CPU."""
    facts: MachineFacts = {"torch": torch.__version__, "threads": torch.get_num_threads(), **cpu_capabilities()}
    if onnxruntime_available():
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    return facts


def per_item_cosine(ref: Tensor, got: Tensor) -> float:
    """The smallest cosine between matching items of two ``(B, ...)`` outputs."""
    a = ref.reshape(len(ref), -1).double()
    b = got.reshape(len(got), -1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float(cos.min())


def _seconds(fn: Callable[[], object], reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _export(module: nn.Module, example: Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)


def _graph_ok(folder: Path, record: ChoiceRecord) -> bool:
    """The graph is there and is the one measured (its sha256 recorded)."""
    try:
        return sha256_stream(folder / GRAPH) == record.get("graph_sha256")
    except OSError:
        return False


def _cached(folder: Path, key: str) -> RuntimeChoice | None:
    try:
        record = json.loads((folder / CHOICE).read_text(encoding="utf-8"))
        if record.get("key") != key or record.get("runtime") not in ("torch", "onnxruntime"):
            return None
        if record["runtime"] == "torch":
            return RuntimeChoice("torch", str(record.get("precision") or "fp32"), None, record)  # no graph read
        if not _graph_ok(folder, record):
            return None
        return RuntimeChoice("onnxruntime", "fp32", ort_session(folder / GRAPH, torch.get_num_threads()), record)
    except Exception:  # unreadable, half-written, another version's: measured again
        return None


def choose_runtime(
    name: str,
    module: nn.Module,
    calibration: Tensor,
    torch_paths: Mapping[str, Callable[[Tensor], Tensor]],
    facts: Mapping[str, FactValue],
    cache: Path,
    runtime: str = "auto",
) -> RuntimeChoice:
    """The runtime of the encoder ``module`` (float32, eval mode) for ``runtime``.

    Args:
        name: what the encoder is (names the cache folder).
        module: ``(B, ...) -> (B, ...)``, float32; exported for ONNX Runtime.
        calibration: a batch of its input (deterministic).
        torch_paths: ``{precision: fn}`` of the torch candidates; ``"fp32"`` (float32
            eager) is required: it is the reference.
        facts: the encoder's identity (weights' sha256, input size, ...).
        cache: the cache folder (``$ESLMATCH_CACHE``).
        runtime: ``auto`` (measure, or read the cached choice), ``torch`` (the torch path of
            the highest precision offered other than fp32, else fp32) or ``onnxruntime``.
    """
    if runtime == "torch":
        return RuntimeChoice("torch", next((p for p in torch_paths if p != "fp32"), "fp32"))
    if runtime == "onnxruntime":
        require_onnx()
    if runtime == "auto" and not onnxruntime_available():
        return RuntimeChoice("torch", next((p for p in torch_paths if p != "fp32"), "fp32"))
    body: KeyBody = {"version": VERSION, "name": name, "facts": dict(facts), "machine": machine_facts()}
    key = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(cache) / "runtimes" / f"{name}-{key}"
    choice = _cached(folder, key)
    if choice is None:
        choice = _measure(folder, key, body, module, calibration, torch_paths)
    if runtime == "onnxruntime" and choice.runtime != "onnxruntime":  # forced: the graph measured with it
        if not _graph_ok(folder, choice.record):
            choice = _measure(folder, key, body, module, calibration, torch_paths)
        choice = RuntimeChoice(
            "onnxruntime", "fp32", choice.session or ort_session(folder / GRAPH, torch.get_num_threads()), choice.record
        )
    return choice


def _measure(
    folder: Path,
    key: str,
    body: KeyBody,
    module: nn.Module,
    x: Tensor,
    torch_paths: Mapping[str, Callable[[Tensor], Tensor]],
) -> RuntimeChoice:
    folder.mkdir(parents=True, exist_ok=True)
    _export(module, x, folder / GRAPH)
    session = ort_session(folder / GRAPH, torch.get_num_threads())
    feed = {"x": x.numpy()}
    runs: dict[str, Callable[[], Tensor]] = {f"torch {p}": functools.partial(fn, x) for p, fn in torch_paths.items()}
    runs["onnxruntime fp32"] = lambda: torch.from_numpy(np.asarray(session.run(None, feed)[0]))
    outputs = {k: fn() for k, fn in runs.items()}
    cosine = {k: per_item_cosine(outputs["torch fp32"], v) for k, v in outputs.items()}
    seconds = {k: _seconds(fn) for k, fn in runs.items() if cosine[k] >= MIN_COSINE or k == "torch fp32"}
    best = min(seconds, key=lambda k: seconds[k])
    runtime, precision = best.split(" ")
    record: ChoiceRecord = {
        **body,
        "key": key,
        "runtime": runtime,
        "precision": precision,
        "items_per_second": {k: round(len(x) / s, 2) for k, s in seconds.items()},
        "min_cosine": {k: round(c, 6) for k, c in cosine.items()},
        "bound": MIN_COSINE,
        "calibration": list(x.shape),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "graph_sha256": sha256_stream(folder / GRAPH),
    }
    atomic_write_text(folder / CHOICE, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return RuntimeChoice(runtime, precision, session, record)
