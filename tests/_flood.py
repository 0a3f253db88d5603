"""A flood of connections against a running server, and a probe that measures how it answers
meanwhile: shared by ``tests/test_serve_abuse.py`` and ``benchmarks/serve_flood.py``."""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
RATE, STEP = 5_000, 500  # sockets a second, in steps of


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raise_own_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def limit_descriptors(n: int):  # noqa: ANN201 (a preexec_fn)
    """A ``preexec_fn`` giving the child a hard descriptor limit of ``n`` (``ulimit -n n``)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def open_idle_sockets(port: int, n: int, socks: list[socket.socket], half_every: int = 2) -> None:
    """``n`` connections to ``port`` that never finish a request head: every ``half_every``-th
    one sends half a head (0: none does); non-blocking connects, so a full accept queue never
    stalls the flood. They come from 127.0.0.2-9, 4,000 per address: Linux gives connect() the
    even half of its ephemeral ports first and scans slowly for the rest, which would slow every
    other client of this machine (the probe included) rather than the server."""
    linger = struct.pack("ii", 1, 0)  # closed with a reset: no TIME_WAIT left behind for later tests
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
        s.bind((f"127.0.0.{2 + (len(socks) // 4000)}", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        if half_every and len(socks) % half_every == 0:
            with contextlib.suppress(OSError):
                s.send(HALF_HEAD)


class Prober(threading.Thread):
    """``GET /healthz`` on a fresh connection every ``every`` seconds, each given ``timeout``
    seconds; the latencies (inf: failed) and when each started."""

    def __init__(self, base: str, every: float = 0.05, timeout: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.base, self.every, self.timeout = base, every, timeout
        self.stop, self.latencies, self.times = threading.Event(), [], []

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                ok = httpx.get(self.base + "/healthz", timeout=self.timeout).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.latencies.append(time.monotonic() - start if ok else float("inf"))
            self.times.append(start)
            self.stop.wait(max(0.0, start + self.every - time.monotonic()))


@dataclass
class Flood:
    """What one flood did and saw (seconds; KiB; bytes)."""

    sockets: int = 0
    opened_s: float = 0.0
    probes: list[float] = field(default_factory=list)
    probe_times: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    log_growth: int = 0

    def summary(self) -> str:
        answered = [p for p in self.probes if p != float("inf")]
        ordered = sorted(self.probes)
        return (
            f"{self.sockets} sockets opened in {self.opened_s:.1f} s; {len(self.probes)} healthz probes, "
            f"{len(answered)} answered, median {ordered[len(ordered) // 2]:.3f} s, max {max(self.probes):.3f} s; "
            f"log +{self.log_growth} bytes; RSS before {self.rss_before // 1024} MiB, "
            f"peak {self.rss_peak // 1024} MiB, after {self.rss_after // 1024} MiB"
        )


def flood(
    base: str,
    pid: int,
    log: Path,
    counts: dict[int, int],
    hold: float,
    every: float = 0.05,
    timeout: float = 30.0,
) -> Flood:
    """Open ``counts`` connections (``{half_every: n}``, see :func:`open_idle_sockets`) at
    :data:`RATE` a second, interleaved, hold them ``hold`` seconds more while :class:`Prober`
    asks ``/healthz``, close them; what was seen."""
    port = int(base.rsplit(":", 1)[1])
    out = Flood(rss_before=rss_kib(pid))
    out.rss_peak, log_before = out.rss_before, log.stat().st_size
    prober = Prober(base, every, timeout)
    prober.start()
    time.sleep(0.3)
    start, socks, left = time.monotonic(), [], dict(counts)
    while any(left.values()):
        for half_every, n in left.items():
            step = min(STEP // len(counts), n)
            open_idle_sockets(port, step, socks, half_every)
            left[half_every] = n - step
        out.rss_peak = max(out.rss_peak, rss_kib(pid))
        time.sleep(STEP / RATE)
    out.sockets, out.opened_s = len(socks), time.monotonic() - start
    while time.monotonic() - start < out.opened_s + hold:
        out.rss_peak = max(out.rss_peak, rss_kib(pid))
        time.sleep(0.1)
    prober.stop.set()
    prober.join(timeout + 5)
    out.probes, out.probe_times = list(prober.latencies), [t - start for t in prober.times]
    for s in socks:
        s.close()
    time.sleep(1.0)
    out.rss_after, out.log_growth = rss_kib(pid), log.stat().st_size - log_before
    return out
