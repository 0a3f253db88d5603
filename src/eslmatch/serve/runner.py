"""Running the app with uvicorn under abuse: bounded connections, timeouts, a quiet log.

uvicorn's h11 protocol never times out a client that has not finished its request head, and
it accepts connections until the process runs out of file descriptors; asyncio then logs a
traceback for every failed ``accept()`` (thousands a second). :class:`GuardedH11Protocol`
adds what is missing, per connection:

- a **head timeout**: the request line and headers must arrive within ``header_timeout``
  seconds of the connection (or of the first byte after a keep-alive pause), else the
  connection is closed (``408`` when the client had sent part of a head);
- a **body timeout**: the whole body must arrive within ``body_timeout`` seconds of its head;
- a **cap** on open connections below the descriptor limit: at the cap, a new connection
  evicts the oldest *idle* one (waiting for a request head or idle between keep-alive
  requests), so a flood of silent sockets cannot lock out a client that sends its request;
  only when every open connection is busy with a request is the new one closed at once.

What it closes is counted and logged in one line per ``log_interval`` seconds, and
:class:`RepeatFilter` lets one record per message through per interval on uvicorn's and
asyncio's loggers (the rest are counted into the next one). :func:`bind_socket` takes the port
before anything slow loads, and the same socket is handed to uvicorn (no race).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from ..errors import EslmatchError
from .limits import ACCEPT_BATCH, ConnectionLimits, connection_cap

if TYPE_CHECKING:
    from starlette.types import ASGIApp
    from uvicorn.server import ServerState

log = logging.getLogger("uvicorn.error")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), or :class:`EslmatchError` in
    one line when the port is taken or the address is not this machine's."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EslmatchError(f"cannot bind to {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EslmatchError(
                f"port {port} on {host} is in use (another server?); pick another with --port, or --port 0 for a "
                "free one"
            ) from None
        if exc.errno == errno.EACCES:
            raise EslmatchError(f"no permission to bind to port {port} on {host} (ports below 1024 need it)") from None
        raise EslmatchError(f"cannot bind to {host}:{port}: {exc.strerror}") from None
    return sock


class ConnectionGuard:
    """What every connection of one server shares: the count, the idle ones oldest first, and
    counters of what was closed (logged once per interval)."""

    def __init__(self, limits: ConnectionLimits, cap: int) -> None:
        self.limits, self.cap = limits, cap
        self.open = 0
        self.idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.counts = {"refused": 0, "evicted": 0, "head": 0, "body": 0, "send": 0}
        self._flush_at: float | None = None
        self._last_flush = 0.0

    def admit(self, conn: GuardedProtocol) -> bool:
        """Count a new connection in; at the cap evict the oldest idle one first, and when
        none is idle refuse the new one (``False``)."""
        if self.open >= self.cap and not self.shed(1):
            self.note("refused")
            return False
        self.open += 1
        return True

    def shed(self, n: int) -> int:
        """Evict up to ``n`` of the oldest idle connections now (the descriptors run out); how many."""
        done = 0
        while done < n and self.idle:
            victim, _ = self.idle.popitem(last=False)
            victim.evict()
            self.open -= 1
            done += 1
        if done:
            self.note("evicted")
            self.counts["evicted"] += done - 1
        return done

    def release(self, conn: GuardedProtocol) -> None:
        """A counted connection closed."""
        self.idle.pop(conn, None)
        self.open -= 1

    def set_idle(self, conn: GuardedProtocol, idle: bool) -> None:
        if idle:
            self.idle[conn] = None
            self.idle.move_to_end(conn)
        else:
            self.idle.pop(conn, None)

    def note(self, what: str) -> None:
        self.counts[what] += 1
        if self._flush_at is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_flush + self.limits.log_interval - time.monotonic())
            self._flush_at = time.monotonic() + delay
            loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log what was closed since the last line, in one line."""
        self._flush_at, self._last_flush = None, time.monotonic()
        c, lim = self.counts, self.limits
        parts = []
        if c["head"]:
            parts.append(f"{c['head']} sent no complete request head within {lim.header_timeout:g} s")
        if c["body"]:
            parts.append(f"{c['body']} sent no complete body within {lim.body_timeout:g} s")
        if c["send"]:
            parts.append(f"{c['send']} read nothing of their response for {lim.send_timeout:g} s")
        if c["evicted"]:
            parts.append(f"{c['evicted']} idle ones made room for new ones (at the cap of {self.cap} open)")
        if c["refused"]:
            parts.append(f"{c['refused']} new ones refused (all {self.cap} open connections busy)")
        level = logging.WARNING if c["evicted"] or c["refused"] else logging.INFO
        if parts:  # counts in the text: RepeatFilter keys on it, and each line differs
            log.log(level, "eslmatch: closed connections: " + "; ".join(parts))
        self.counts = dict.fromkeys(c, 0)


class Listener(socket.socket):
    """The listening socket handed to asyncio. asyncio uses one number both as the kernel's
    queue and as the connections it accepts per turn: the queue here is ``queue`` long whatever
    asyncio asks (``listen``), asyncio is given :data:`~.limits.ACCEPT_BATCH`. An ``accept()``
    that finds no descriptor left evicts idle connections and reports the queue empty, so that the
    next turn (their descriptors closed) accepts again, rather than asyncio's one-second pause
    (during which every client waited behind the flood in the queue)."""

    queue: int = 4096
    guard: ConnectionGuard | None = None

    @classmethod
    def wrap(cls, sock: socket.socket, queue: int, guard: ConnectionGuard) -> Listener:
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.queue, listener.guard = queue, guard
        return listener

    def listen(self, backlog: int = 0) -> None:
        super().listen(self.queue)

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE) and self.guard is not None and self.guard.shed(ACCEPT_BATCH):
                raise BlockingIOError(exc.errno, exc.strerror) from None
            raise


def guarded_protocol(guard: ConnectionGuard) -> type:
    """A :class:`GuardedProtocol` subclass bound to ``guard`` (uvicorn's ``http=``)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


class GuardedProtocol(asyncio.Protocol):
    """One connection: counted against the cap, timed, and handed to uvicorn's h11 protocol
    only once its first request head is complete (a silent or half-sent connection costs a
    transport and a buffer, not an HTTP parser)."""

    guard: ConnectionGuard

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.inner: _H11 | None = None
        self.head = bytearray()  # what came before the first head was complete
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""
        self.seen_cycle: RequestResponseCycle | None = None
        self.admitted = self.counted = False
        self.send_timer: asyncio.TimerHandle | None = None  # armed while the client reads nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admitted = self.counted = self.guard.admit(self)
        if not self.admitted:
            transport.abort()  # type: ignore[attr-defined]
            return
        # closed by uvicorn's shutdown like its own (which only calls .shutdown(); uvicorn's annotation
        # names its own protocol classes)
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self.guard.set_idle(self, True)
        self.arm(self.guard.limits.header_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:  # refused at once
            return
        self.disarm()
        self._stop_send_timer()
        self.server_state.connections.discard(self)
        if self.counted:
            self.counted = False
            self.guard.release(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            seen = len(self.head)
            self.head += data
            limit = self.config.h11_max_incomplete_event_size or 16 * 1024
            if not _head_complete(self.head, seen) and len(self.head) <= limit:
                return
            self.inner = _H11(self.config, self.server_state, self.app_state, self.loop)
            self.inner.outer = self
            self.server_state.connections.discard(self)  # the h11 protocol counts itself in from here
            self.inner.connection_made(self.transport)  # type: ignore[arg-type]
            data, self.head = bytes(self.head), bytearray()
        self.inner.data_received(data)
        if self.sync() and self.timer is None and not self.transport.is_closing():  # type: ignore[union-attr]
            self.arm(self.guard.limits.header_timeout, "head")  # the first bytes after a keep-alive pause

    def eof_received(self) -> None:
        if self.inner is not None:
            self.inner.eof_received()

    def pause_writing(self) -> None:
        """The client reads our response slower than we write it: past ``send_timeout`` with no
        progress, the connection is closed (a reader that never reads held its slot for ever)."""
        if self.inner is not None:
            self.inner.pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.guard.limits.send_timeout, self.stalled)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        if self.inner is not None:
            self.inner.resume_writing()

    def _stop_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def stalled(self) -> None:
        self.send_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.note("send")
            self.transport.abort()

    def shutdown(self) -> None:
        """uvicorn stops: an idle connection closes now, a busy one after its response."""
        if self.inner is not None:
            self.inner.shutdown()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def evict(self) -> None:
        """Close this idle connection now (the guard no longer counts it)."""
        self.disarm()
        self.counted = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def sync(self) -> bool:
        """Follow the request cycle (new head: stop the head timer, start the body timer;
        body done: stop it); whether the connection is idle (no request in progress)."""
        cycle = self.inner.cycle if self.inner is not None else None
        if cycle is not None and cycle is not self.seen_cycle:
            self.seen_cycle = cycle
            self.disarm()
            if cycle.more_body:
                self.arm(self.guard.limits.body_timeout, "body")
        idle = cycle is None or cycle.response_complete
        if self.timer is not None and self.timer_kind == "body" and (cycle is None or idle or not cycle.more_body):
            self.disarm()  # the body came, or the answer went without it (a 413, say)
        if self.counted:
            self.guard.set_idle(self, idle)
        return idle

    def arm(self, seconds: float, kind: str) -> None:
        self.disarm()
        self.timer_kind = kind
        self.timer = self.loop.call_later(seconds, self.timed_out, kind)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timed_out(self, kind: str) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.guard.note(kind)
        if kind == "head" and (self.head or self.inner is not None):  # it had sent part of a head: say why
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        transport.close()


def _head_complete(buffer: bytearray, seen: int) -> bool:
    """Whether ``buffer`` holds a blank line (the end of a request head, ``\\n\\n`` or
    ``\\n\\r\\n`` as h11 reads it), looking only past the ``seen`` bytes already searched."""
    start = max(0, seen - 2)
    return buffer.find(b"\n\n", start) >= 0 or buffer.find(b"\n\r\n", start) >= 0


class _H11(H11Protocol):
    """uvicorn's h11 protocol telling its :class:`GuardedProtocol` when a response is done."""

    outer: GuardedProtocol

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.outer.counted:
            self.outer.sync()


class RepeatFilter(logging.Filter):
    """Let one record per (logger, first line of its message) through per ``interval``
    seconds; the next one let through says how many were dropped."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        dropped = int(entry[1]) if entry else 0
        if len(self._seen) >= 1024:
            self._seen.clear()
        self._seen[key] = [now, 0]
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in the last {self.interval:g} s, not shown)"
        return True


class _Server(uvicorn.Server):
    """uvicorn's server, writing the last counts of closed connections when it stops."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.guard.flush()  # uvicorn re-raises SIGTERM once stopped: nothing after run() would run
        await super().shutdown(sockets)


def run_server(app: ASGIApp, sock: socket.socket, limits: ConnectionLimits, log_level: str = "info") -> None:
    """Serve ``app`` on the bound ``sock`` until Ctrl-C / SIGTERM, under ``limits``."""
    guard = ConnectionGuard(limits, connection_cap(limits))
    config = uvicorn.Config(
        app,
        http=guarded_protocol(guard),
        ws="none",
        log_level=log_level,
        server_header=False,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=5,
        backlog=ACCEPT_BATCH,  # accepted per turn; the kernel's queue is the Listener's
    )
    # What was loaded (torch, the model, the gallery: some 200,000 objects) lives as long as the
    # server: keep it out of the cyclic collector, whose full passes would otherwise walk it
    # again and again while a flood of connections allocates (pauses of 0.2 s and more).
    gc.collect()
    gc.freeze()
    quiet = RepeatFilter(limits.log_interval)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(quiet)
    try:
        _Server(config, guard).run(sockets=[Listener.wrap(sock, limits.backlog, guard)])
    finally:
        for name in ("asyncio", "uvicorn.error"):
            logging.getLogger(name).removeFilter(quiet)
