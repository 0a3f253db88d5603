"""sha256 digests of weight files, streamed, and cached by size and modification time.

Hashing a BERT-sized file takes about half a second, and every load of a model folder checks
its weights, so a digest is remembered in a small JSON file beside the file it covers
(``.model.safetensors.sha256-cache.json`` in the model folder), keyed by the file's size and
``st_mtime_ns``. Anything that rewrites the file changes its mtime and so
forces a new hash. The cache is only ever a shortcut: absent, unreadable, malformed or on a
read-only file system, the digest is computed; ``use_cache=False`` always computes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CACHE_SUFFIX = ".sha256-cache.json"
_CHUNK = 8 << 20


def sha256_stream(path: str | Path, chunk: int = _CHUNK) -> str:
    """The hex sha256 of a file, read ``chunk`` bytes at a time (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_path(path: Path) -> Path:
    """Where the digest of ``path`` is cached: ``.NAME.sha256-cache.json`` beside it."""
    return path.with_name(f".{path.name}{CACHE_SUFFIX}")


def _cached(path: Path, key: tuple[int, int]) -> str | None:
    try:
        data = json.loads(cache_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (data.get("size"), data.get("mtime_ns")) != key:
        return None
    digest = data.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def file_digest(path: str | Path, use_cache: bool = True) -> str:
    """The sha256 of ``path`` (hex), from the cache when its size and mtime still match;
    ``use_cache=False`` reads the whole file whatever the cache says."""
    p = Path(path)
    st = p.stat()
    if use_cache and (hit := _cached(p, (st.st_size, st.st_mtime_ns))) is not None:
        return hit
    digest = sha256_stream(p)
    remember(p, digest)
    return digest


def remember(path: Path, digest: str) -> None:
    """Cache ``digest`` for ``path``'s current size and mtime; silently skipped where the
    folder cannot be written (the cache is never required)."""
    cache = cache_path(path)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        st = path.stat()
        tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
