"""Atomic writes: a file or a folder appears whole at its final path, or not at all.

Everything is written under a temporary name beside the target (same file system) and moved
into place with ``os.replace``. Temporary names start with ``.NAME.tmp-`` (and ``.NAME.old-``
for a folder being replaced), so :func:`clean_stale` can remove what an interrupted run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import EslmatchError


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


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be: setting it to read it back,
    the only portable way, races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file written by a library that creates it private (``safetensors`` writes 0600)
    the mode an ordinary ``open`` gives: ``0o666 & ~umask``."""
    os.chmod(path, 0o666 & ~current_umask())


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


def replace_journal(dst: Path) -> Path:
    """The journal of a :func:`replace_dir` of ``dst`` under way (or left by a crash)."""
    return dst.with_name(f".{dst.name}.replace")


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse a folder ``out`` that a write would replace whole unless it is absent, empty, or
    already ``what`` (it holds ``marker``): a file, a FIFO or a device in the way (replacing a
    FIFO blocked for ever, opening it to delete it), or someone else's folder."""
    if out.exists() and not out.is_dir():
        raise EslmatchError(f"{out}: exists and is not a folder ({what} is a folder); choose another")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise EslmatchError(f"{out}: a non-empty folder that is not {what}; choose another")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an old ``dst`` is removed only after.

    Replacing takes two renames (``dst`` aside, ``src`` in). A journal beside ``dst``
    (``.NAME.replace``, written first) names both folders, so a process dying between the
    renames leaves nothing to guess: :func:`recover_replace` (run by the next open or write of
    ``dst``) finishes the replacement, or rolls it back when the new folder is gone.
    """
    if not dst.exists():
        os.replace(src, dst)
        fsync_path(dst.parent)
        return
    if not dst.is_dir():
        raise EslmatchError(f"{dst}: exists and is not a folder; nothing replaced")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    journal = replace_journal(dst)
    atomic_write_text(journal, json.dumps({"new": src.name, "old": old.name, "pid": os.getpid()}))
    os.replace(dst, old)
    os.replace(src, dst)
    fsync_path(dst.parent)
    journal.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def recover_replace(dst: str | Path) -> bool:
    """Finish (or roll back) a :func:`replace_dir` of ``dst`` that a dead process left half
    done; ``True`` when there was one. A replacement still running in a live process is left
    alone."""
    dst = Path(dst)
    journal = replace_journal(dst)
    if not journal.is_file():
        return False
    try:
        rec = json.loads(journal.read_text(encoding="utf-8"))
        new, old, pid = dst.with_name(str(rec["new"])), dst.with_name(str(rec["old"])), int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)  # torn before the first rename: nothing was moved
        return True
    if pid != os.getpid() and pid_alive(pid):
        return False
    if not dst.exists():
        if new.is_dir():
            os.replace(new, dst)  # both renames were due: finish
        elif old.is_dir():
            os.replace(old, dst)  # the new folder is gone: roll back
    if dst.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(dst.parent)
    journal.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    On failure (or interruption) the temporary folder is removed and ``path`` is untouched.
    Litter of an earlier killed run is cleaned first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replace(target)
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


def default_cache_dir() -> Path:
    """``$ESLMATCH_CACHE`` or ``$XDG_CACHE_HOME/eslmatch`` or ``~/.cache/eslmatch``: the demo's
    datasets and the measured runtimes (:mod:`eslmatch.export.runtime`)."""
    if os.environ.get("ESLMATCH_CACHE"):
        return Path(os.environ["ESLMATCH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eslmatch"
