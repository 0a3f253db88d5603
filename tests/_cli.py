"""Helpers for tests of the command line: one in-process call, and a process interrupted."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable

from eslmatch.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``eslmatch ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def interrupted(proc: subprocess.Popen, before: Callable[[], None] | None = None) -> tuple[int, str]:
    """Ctrl-C (SIGINT) to ``proc`` after ``before()`` (e.g. waiting for its first line):
    ``(exit code, stderr)``; the process is killed whatever happens."""
    try:
        if before is not None:
            before()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err.decode()
