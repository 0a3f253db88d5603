"""Atomic writes: a file or a folder appears whole at its final path, or not at all.

Everything is written under a temporary name beside the target (same file system) and moved
into place with ``os.replace``. Temporary names start with ``.NAME.tmp-`` (and ``.NAME.old-``
for a folder being replaced), so :func:`clean_stale` can remove what an interrupted run left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def clean_stale(path: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` litter beside ``path`` left by interrupted writes.

    Only entries whose owning process is gone are removed (the pid is part of the name).
    Returns the removed paths.
    """
    p = Path(path)
    if not p.parent.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        for entry in p.parent.glob(f".{p.name}.{kind}-*"):
            pid = entry.name.rsplit("-", 1)[-1].split(".")[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (ours counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (e.g. a memory map); on success it
    is renamed to ``path``, on failure removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{_temp_prefix(target)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, synced and renamed.

    ``mode`` is ``"w"`` (UTF-8 text, ``\\n`` newlines) or ``"wb"``.
    """
    with atomic_path(path) as tmp:
        text = "b" not in mode
        with open(tmp, mode, encoding="utf-8" if text else None, newline="\n" if text else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` (no pickles) to ``path`` atomically."""
    with atomic_file(path, "wb") as fh:
        np.save(fh, np.asarray(array), allow_pickle=False)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an old ``dst`` is removed only after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    On failure (or interruption) the temporary folder is removed and ``path`` is untouched.
    Litter of an earlier killed run is cleaned first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.with_name(f"{_temp_prefix(target)}{os.getpid()}")
    if tmp.exists():  # this process's own earlier, failed attempt
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
