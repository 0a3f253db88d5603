"""What a server allows: per-request limits (:class:`ServeConfig`) and per-connection limits
(:class:`ConnectionLimits`, the open-connection cap from the descriptor limit).

Plain data and the standard library only, so that ``eslmatch serve`` refuses a bad limit in
one line before torch, FastAPI or the gallery are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..errors import EslmatchError

RESERVED_FDS = 1024  # at most this many descriptors kept for requests (an image served, an upload)
MAX_CAP = 65536  # an idle connection costs a few KiB; this bounds the memory a flood can take
# Connections accepted per turn of the event loop. asyncio accepts up to its ``backlog`` argument
# per turn, and a connection is counted (and an idle one evicted for it) only a turn or two later:
# with 4,096 a turn, a flood met the descriptor limit before the cap was ever consulted.
ACCEPT_BATCH = 64
IN_FLIGHT = 4 * ACCEPT_BATCH  # accepted, not yet counted, plus evicted, not yet closed


def _option(help: str, metavar: str, flag: str | None = None) -> dict[str, str]:
    """A limit the command line sets (``--`` + its name, or ``flag``), with its help."""
    return {"help": help, "metavar": metavar, **({"flag": flag} if flag else {})}


@dataclass(frozen=True)
class Option:
    """A limit as a command-line option: ``--flag`` sets the field ``name`` of its class."""

    flag: str
    name: str
    type: type
    default: float
    metavar: str
    help: str


def options_of(limits: type[ConnectionLimits] | type[ServeConfig]) -> list[Option]:
    """The limits of ``limits`` (a class) that the command line sets: one home for each one's
    default, meaning and flag (``eslmatch serve --help`` shows them)."""
    return [
        Option(
            f.metadata.get("flag", "--" + f.name.replace("_", "-")),
            f.name,
            float if isinstance(f.default, float) else int,
            f.default,  # type: ignore[arg-type]  # every option's default is a number
            f.metadata["metavar"],
            f.metadata["help"],
        )
        for f in fields(limits)
        if "help" in f.metadata
    ]


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of a running server (seconds; ``max_connections`` 0: from the
    descriptor limit, see :func:`default_max_connections`; ``backlog``: the kernel's queue of
    connections not yet accepted)."""

    header_timeout: float = field(
        default=10.0,
        metadata=_option("close a connection whose request line and headers are not complete within S seconds", "S"),
    )
    body_timeout: float = field(
        default=60.0,
        metadata=_option("close a connection whose request body is not complete within S seconds of its headers", "S"),
    )
    keep_alive_timeout: float = field(
        default=5.0, metadata=_option("close a kept-alive connection idle for S seconds", "S")
    )
    send_timeout: float = field(
        default=30.0, metadata=_option("close a connection that reads nothing of its response for S seconds", "S")
    )
    max_connections: int = field(
        default=0,
        metadata=_option(
            "most open connections; at N a new one closes the oldest idle one, or is closed when none is idle "
            "(0: the file-descriptor limit, raised to its hard limit, less a reserve of a quarter of it, at most "
            "1024; at most 65536)",
            "N",
        ),
    )
    backlog: int = field(
        default=4096,
        metadata=_option(
            "connections the kernel queues before the server accepts them (it caps them at net.core.somaxconn)", "N"
        ),
    )
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

    max_text_chars: int = field(default=1000, metadata=_option("longest query in characters", "N", "--max-text"))
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 20 << 20  # the command line takes --max-upload-mb
    max_pixels: int = field(default=40_000_000, metadata=_option("largest uploaded photo in pixels", "N"))
    max_photos: int = 64
    max_k: int = field(default=1000, metadata=_option("most results per search", "N"))
    max_rerank_k: int = field(default=2000, metadata=_option("largest rerank_k allowed", "N"))
    default_k: int = 10
    default_rerank_k: int = 100
    max_pending: int = field(
        default=256,
        metadata=_option("most searches and writes waiting for the model; beyond them the answer is 503 at once", "N"),
    )

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
