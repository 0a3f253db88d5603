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


def killed_mid_epoch(
    argv: Sequence[str], env: dict[str, str], run_dir: Path, steps: int, epoch: int = 1
) -> tuple[dict, dict]:
    """Run ``argv`` (a training run writing into ``run_dir``) and SIGKILL it once it saved a
    resumable state in the middle of epoch ``epoch`` (``steps`` steps each): ``(the save record
    seen, the state left on disk)``. The kill races the run, and a loaded CPU can let it pass the
    epoch's end first: such a try (it says nothing of the product) is made again, 5 at most."""
    import json
    import shutil
    import time

    from eslmatch.training.state import STATE_NAME, load_state_file

    log_path = run_dir.with_name(run_dir.name + ".log")
    for _ in range(5):
        shutil.rmtree(run_dir, ignore_errors=True)
        metrics, seen = run_dir / "metrics.jsonl", None
        with log_path.open("w") as log:
            proc = subprocess.Popen(list(argv), env=env, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
                records = [json.loads(x) for x in lines if x.endswith("\n")]  # not a half-written last line
                saves = [r for r in records if r["kind"] == "save" and r["epoch"] >= epoch and r["step_in_epoch"] > 0]
                if saves:
                    seen = saves[0]
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            proc.wait()
        assert seen is not None or proc.returncode == 0, log_path.read_text()
        if seen is not None and proc.returncode == -signal.SIGKILL:
            state = load_state_file(run_dir / STATE_NAME)
            if state["epoch"] == epoch and 0 < state["step_in_epoch"] < steps:
                return seen, state
    raise AssertionError(f"no kill landed in the middle of epoch {epoch} in 5 tries: {log_path.read_text()}")
