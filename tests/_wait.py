"""How tests wait: for an event they can observe, never for a guess at how fast the CPU is.

A timeout stops a hung process; it never judges speed. :data:`HUNG` is sized for the slowest
CPU of our machine kind (2 AVX2 cores, fp32 eager encoders) with another process busy beside
the test suite, so that only a hang reaches it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

HUNG = 600  # seconds

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, limit: float = HUNG, every: float = 0.05) -> T:
    """Call ``check`` until it returns something true (returned); fail after ``limit`` seconds,
    naming ``what`` was awaited."""
    deadline = time.monotonic() + limit
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {limit:.0f} s")
        time.sleep(every)


def wait_for_server(
    base: str, proc: subprocess.Popen, log: Path | None = None, ready: Callable[[Any], bool] | None = None
) -> None:
    """Wait until the server ``proc`` answers ``GET base/healthz`` (and ``ready(response)``);
    fail at once, with its log, if it exits first."""
    import httpx

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            resp = httpx.get(base + "/healthz", timeout=HUNG)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and (ready is None or ready(resp))

    wait_until(up, f"the server at {base} answering", every=0.2)
