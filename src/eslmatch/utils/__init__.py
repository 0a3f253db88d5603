"""Small utilities shared by every layer: atomic files, devices, precision, masks. One home each.

Names are imported on first use (:mod:`eslmatch.utils.lazy`), so ``eslmatch.utils.io`` and
``eslmatch.utils.choices`` can be used without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

if TYPE_CHECKING:
    from .choices import PRECISIONS
    from .device import resolve_device
    from .io import (
        atomic_dir,
        atomic_file,
        atomic_path,
        atomic_save_npy,
        atomic_write_text,
        clean_stale,
        honour_umask,
        pid_alive,
        recover_replace,
        replace_dir,
    )
    from .precision import encode_in, inference_precision, native_bf16, resolve_precision, to_float32
    from .tensors import l2n, lengths_to_mask, masked_mean

_WHERE = {
    "resolve_device": ".device",
    **dict.fromkeys(
        (
            "atomic_dir",
            "atomic_file",
            "atomic_path",
            "atomic_save_npy",
            "atomic_write_text",
            "clean_stale",
            "honour_umask",
            "pid_alive",
            "recover_replace",
            "replace_dir",
        ),
        ".io",
    ),
    "PRECISIONS": ".choices",
    **dict.fromkeys(
        ("encode_in", "inference_precision", "native_bf16", "resolve_precision", "to_float32"), ".precision"
    ),
    **dict.fromkeys(("l2n", "lengths_to_mask", "masked_mean"), ".tensors"),
}
__getattr__ = lazy_attributes(__name__, _WHERE)

__all__ = [
    "PRECISIONS",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "atomic_save_npy",
    "atomic_write_text",
    "clean_stale",
    "encode_in",
    "honour_umask",
    "inference_precision",
    "l2n",
    "lengths_to_mask",
    "masked_mean",
    "native_bf16",
    "pid_alive",
    "recover_replace",
    "replace_dir",
    "resolve_device",
    "resolve_precision",
    "to_float32",
]
