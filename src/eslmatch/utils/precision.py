"""The precision encoders run in: one rule for every encoding path (extract, embed, index, search).

``"fp32"`` is the reference: float32 eager PyTorch, exactly as before. ``"bf16"`` runs the
encoders under bfloat16 autocast (weights stay float32; matrix products and convolutions take
bf16 inputs) and hands back float32 outputs. ``"auto"`` is bf16 where the device computes it
natively and fp32 elsewhere:

- CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and later);
- CPU: the capabilities torch reports (``torch.cpu.get_capabilities()``) include AMX-BF16 or
  AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later); without them bf16 is
  emulated and slower than float32.

Scores are not touched here: the scoring engine keeps the precision its
:class:`~eslmatch.scoring.ScoringOptions` name.

.. code-block:: python

    precision = resolve_precision("auto", device)          # "fp32" or "bf16"
    with inference_precision(precision, device):
        vectors = model.embed_images(x)                     # bf16 autocast when "bf16"
    vectors = vectors.float()
    # or, in one call:
    vectors = encode_in(precision, device, model.embed_images, x)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

from .choices import check_precision

# The CPU features that make bf16 matrix products native (names of torch.cpu.get_capabilities()).
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")

T = TypeVar("T")
P = ParamSpec("P")

# What torch reports of the CPU: its name and dispatch level (text), bf16 features (True / False / None).
CpuFacts = dict[str, str | bool | None]


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> CpuFacts:
    """What torch reports about this CPU: its dispatch level (``torch.backends.cpu``), name
    and the bf16 features (``amx_bf16``, ``avx512_bf16``: True / False / None when unknown)."""
    caps: dict[str, Any] = {}  # torch's report, whatever it holds
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = dict(get())
        except Exception:  # a torch build without cpuinfo: fall back to the probes below
            caps = {}
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    out: CpuFacts = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_name": caps.get("cpu_name"),
        "architecture": caps.get("architecture"),
    }
    for feature in CPU_BF16_FEATURES:
        value = caps.get(feature)
        if value is None and hasattr(torch.cpu, probes[feature]):
            value = bool(getattr(torch.cpu, probes[feature])())
        out[feature] = None if value is None else bool(value)
    return out


def native_bf16(device: str | torch.device | None = None) -> bool:
    """True where ``device`` computes bfloat16 natively (see the module docstring)."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if dev.type == "cpu":
        caps = cpu_capabilities()
        return any(bool(caps.get(f)) for f in CPU_BF16_FEATURES)
    return False


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: ``auto`` resolved for ``device`` (CPU when ``None``)."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def inference_precision(precision: str, device: str | torch.device | None = None) -> Iterator[str]:
    """Run the block in ``precision`` on ``device``: bf16 autocast for ``"bf16"`` (``"auto"``
    is resolved first), nothing for ``"fp32"``. Yields the resolved precision.

    Outputs of the block may be bf16 under autocast: pass them through :func:`to_float32`
    (or use :func:`encode_in`, which does)."""
    resolved = resolve_precision(precision, device)
    dev = torch.device("cpu" if device is None else device)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=resolved == "bf16"):
        yield resolved


def to_float32(out: T) -> T:
    """Floating tensors of ``out`` (a tensor, or a tuple / list / dict of them) as float32."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out  # type: ignore[return-value]
    if isinstance(out, (tuple, list)):
        return type(out)(to_float32(x) for x in out)
    if isinstance(out, dict):
        return {k: to_float32(v) for k, v in out.items()}  # type: ignore[return-value]
    return out


def encode_in(
    precision: str, device: str | torch.device | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(*args, **kwargs)`` in ``precision`` (see :func:`inference_precision`), its floating
    outputs returned as float32."""
    with inference_precision(precision, device):
        out = fn(*args, **kwargs)
    return to_float32(out)


def autocast_active(device_type: str) -> bool:
    """True inside a bf16 autocast region for ``device_type`` (``"cpu"``, ``"cuda"``)."""
    if not torch.is_autocast_enabled(device_type):
        return False
    return bool(torch.get_autocast_dtype(device_type) == torch.bfloat16)
