"""Device resolution: one rule for every command and the library."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EslmatchError


def resolve_device(
    device: str | torch.device | None, model: nn.Module | None = None, local_rank: int = 0
) -> torch.device:
    """The device to compute on.

    Args:
        device: ``None`` (the model's device, else CPU), ``"auto"`` (CUDA when available,
            else CPU), or a name (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        model: consulted when ``device`` is ``None``.
        local_rank: a bare ``"cuda"`` (or ``"auto"`` on a CUDA machine) becomes
            ``cuda:local_rank`` (modulo the device count), as each torchrun process needs.
    Raises:
        EslmatchError: an invalid name, or CUDA asked for where there is none.
    """
    if device is None:
        if model is not None:
            try:
                return next(model.parameters()).device
            except StopIteration:
                pass
        return torch.device("cpu")
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise EslmatchError(f"invalid device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EslmatchError(f"device {name!r} asked for but CUDA is not available (use cpu or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
