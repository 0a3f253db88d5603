"""What a server allows: per-request limits (:class:`ServeConfig`) and per-connection limits
(:class:`ConnectionLimits`, the open-connection cap from the descriptor limit).

Plain data and the standard library only, so that ``eslmatch serve`` refuses a bad limit in
one line before torch, FastAPI or the gallery are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import EslmatchError

RESERVED_FDS = 1024  # at most this many descriptors kept for requests (an image served, an upload)
MAX_CAP = 65536  # an idle connection costs a few KiB; this bounds the memory a flood can take
# Connections accepted per turn of the event loop. asyncio accepts up to its ``backlog`` argument
# per turn, and a connection is counted (and an idle one evicted for it) only a turn or two later:
# with 4,096 a turn, a flood met the descriptor limit before the cap was ever consulted.
ACCEPT_BATCH = 64
IN_FLIGHT = 4 * ACCEPT_BATCH  # accepted, not yet counted, plus evicted, not yet closed


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of a running server (seconds; ``max_connections`` 0: from the
    descriptor limit, see :func:`default_max_connections`; ``backlog``: the kernel's queue of
    connections not yet accepted)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    send_timeout: float = 30.0  # a response the client reads nothing of for this long: closed
    max_connections: int = 0
    backlog: int = 4096  # the kernel caps it at net.core.somaxconn
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "send_timeout", "log_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds (got {getattr(self, name)})")
        if self.max_connections < 0:
            raise ValueError(f"--max-connections must be >= 1, or 0 for the default (got {self.max_connections})")
        if self.backlog < 1:
            raise ValueError(f"--backlog must be >= 1 (got {self.backlog})")


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; the soft limit now
    (512, the C runtime's default, where there is no such limit: Windows)."""
    try:
        import resource
    except ImportError:
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def open_descriptors() -> int:
    """Descriptors this process holds now (the gallery's files, the log, the listening socket...;
    64 where the system does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 64


def most_connections(fd_limit: int, held: int = 0) -> int:
    """Open connections ``fd_limit`` descriptors can hold beside the ``held`` ones: less the
    connections in flight (:data:`IN_FLIGHT`) and a reserve for requests (an eighth of the limit,
    128 to 1024), at least 16."""
    return max(16, fd_limit - held - IN_FLIGHT - min(RESERVED_FDS, max(128, fd_limit // 8)))


def default_max_connections(fd_limit: int, held: int = 0) -> int:
    """The default cap: :func:`most_connections`, at most 65536. 20000 -> 18720, 1024 -> 640."""
    return min(MAX_CAP, most_connections(fd_limit, held))


def connection_cap(limits: ConnectionLimits) -> int:
    """The open-connection cap of ``limits`` (the default from the descriptor limit, raised to
    its hard limit first, and the descriptors the process holds now); :class:`EslmatchError` for
    a cap the descriptors cannot hold."""
    fd_limit, held = raise_fd_limit(), open_descriptors()
    most = most_connections(fd_limit, held)
    if limits.max_connections > most:
        raise EslmatchError(
            f"--max-connections {limits.max_connections} is more than this process's file-descriptor limit "
            f"({fd_limit}, {held} in use) allows: at most {most} (raise the limit with 'ulimit -n', or give less)"
        )
    return limits.max_connections or default_max_connections(fd_limit, held)


@dataclass(frozen=True)
class ServeConfig:
    """Limits on what one request may ask for."""

    max_text_chars: int = 1000
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_photos: int = 64
    max_k: int = 1000
    max_rerank_k: int = 2000
    default_k: int = 10
    default_rerank_k: int = 100
    max_pending: int = 256  # queued inference jobs before answering 503

    def __post_init__(self) -> None:
        for name in (
            "max_text_chars",
            "max_body_bytes",
            "max_upload_bytes",
            "max_pixels",
            "max_photos",
            "max_k",
            "max_pending",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_rerank_k < 0:
            raise ValueError(f"ServeConfig.max_rerank_k must be >= 0 (got {self.max_rerank_k})")
