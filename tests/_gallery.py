"""Copy a gallery folder for a test that damages it, while other handles may be open on it.

Every byte is copied: the library's ``copy_gallery`` hard-links files, so damaging its copy
would damage the source too. A plain ``shutil.copytree`` races with those handles: SQLite
removes ``catalog.sqlite-shm`` and ``-wal`` when the last connection closes (for example when a gallery left over from an
earlier test is garbage-collected), so the copy can fail half-way (it did once in CI). The
catalogue is copied with SQLite's backup API instead, a consistent snapshot that folds in
whatever the write-ahead log holds.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def copy_to_damage(source: Path, target: Path) -> Path:
    """``source`` copied to ``target`` (every file, the catalogue as one consistent snapshot)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("catalog.sqlite*"))
    for catalogue in Path(source).rglob("catalog.sqlite"):
        copy = Path(target) / catalogue.relative_to(source)
        with sqlite3.connect(catalogue) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        src.close()
        dst.close()
    return Path(target)
