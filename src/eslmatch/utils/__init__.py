"""Small utilities shared by every layer: atomic files, devices, masks. One home each."""

from .device import resolve_device
from .io import (
    atomic_dir,
    atomic_file,
    atomic_path,
    atomic_save_npy,
    atomic_write_text,
    clean_stale,
    pid_alive,
    replace_dir,
)
from .tensors import l2n, lengths_to_mask, masked_mean

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "atomic_save_npy",
    "atomic_write_text",
    "clean_stale",
    "pid_alive",
    "l2n",
    "lengths_to_mask",
    "masked_mean",
    "replace_dir",
    "resolve_device",
]
