"""Small utilities shared by every layer: atomic files, devices, precision, masks. One home each."""

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
from .precision import PRECISIONS, encode_in, inference_precision, native_bf16, resolve_precision, to_float32
from .tensors import l2n, lengths_to_mask, masked_mean

__all__ = [
    "PRECISIONS",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "atomic_save_npy",
    "atomic_write_text",
    "clean_stale",
    "honour_umask",
    "encode_in",
    "inference_precision",
    "pid_alive",
    "l2n",
    "lengths_to_mask",
    "masked_mean",
    "native_bf16",
    "recover_replace",
    "replace_dir",
    "resolve_device",
    "resolve_precision",
    "to_float32",
]
