"""Helpers for tests of the command line: one in-process call, a process started as a terminal
starts it, and a process interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eslmatch.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
ANSWER_CTRL_C = 60  # seconds

# ``python -c`` source running ``eslmatch ARGV`` as ``python -m eslmatch.cli`` does, after printing
# ``importing torch`` on stdout the moment torch's import begins (an event a test can wait for).
ANNOUNCE_TORCH = """
import sys

class Announce:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            print("importing torch", flush=True)
        return None

sys.meta_path.insert(0, Announce())
from eslmatch.cli import run
run()
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``eslmatch ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _as_a_terminal_starts_it() -> None:
    # A shell without job control starts background commands (`pytest ... &` in a script) with
    # SIGINT ignored, their children inherit that, and Python then leaves it ignored: Ctrl-C
    # would do nothing. A terminal's foreground process gets the default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """``argv`` started as from a terminal (SIGINT at its default action), stdout and stderr
    piped, this checkout's sources first on PYTHONPATH, and without ``PYTHONUNBUFFERED`` (a
    user's shell rarely sets it: what the command prints must reach a pipe by itself)."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONUNBUFFERED", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_as_a_terminal_starts_it,
        **kwargs,
    )


def eslmatch_argv(*argv: str, announce_torch: bool = False) -> list[str]:
    """The process argv of ``eslmatch ARGV`` (``announce_torch``: see :data:`ANNOUNCE_TORCH`)."""
    head = [sys.executable, "-c", ANNOUNCE_TORCH] if announce_torch else [sys.executable, "-m", "eslmatch.cli"]
    return [*head, *argv]


def interrupted(proc: subprocess.Popen, before: Callable[[], None] | None = None) -> tuple[int, str]:
    """Ctrl-C (SIGINT) to ``proc`` after ``before()`` (e.g. waiting for its first line):
    ``(exit code, stderr)``; the process is killed whatever happens. A user must see Ctrl-C
    answered within a second or two; :data:`ANSWER_CTRL_C` is a bound no CPU of ours reaches
    unless the interrupt is lost (one step of the work between two checks takes seconds at most)."""
    try:
        if before is not None:
            before()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=ANSWER_CTRL_C)
    finally:
        proc.kill()
    return proc.returncode, err.decode()
