"""Issue 32: one message channel. The library logs through ``logging`` (loggers under
``eslmatch``) and never prints; the command line shows the records as it always did, and
``--quiet`` / ``--debug`` choose how much."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

from eslmatch.utils.messages import NOTE, CliFormatter, cli_logging, note

SRC = Path(__file__).resolve().parents[1] / "src" / "eslmatch"
WARNS = (
    "from pathlib import Path\n"
    "from eslmatch.data.raw import BadImageLog\n"
    "BadImageLog().add(Path('broken.jpg'), 'unreadable image')\n"
)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_library_warning_reaches_an_unconfigured_caller_and_the_logger_level_silences_it():
    shown = python(WARNS)
    assert shown.returncode == 0 and "skipping broken.jpg: unreadable image" in shown.stderr and shown.stdout == ""
    silenced = python("import logging\nlogging.getLogger('eslmatch').setLevel(logging.ERROR)\n" + WARNS)
    assert silenced.returncode == 0 and silenced.stderr == "" and silenced.stdout == ""
    captured = python(  # a caller's own handler gets the record, with its logger's name
        "import logging, io\nbuf = io.StringIO()\nh = logging.StreamHandler(buf)\n"
        "h.setFormatter(logging.Formatter('%(name)s|%(levelname)s|%(message)s'))\n"
        "logging.getLogger('eslmatch').addHandler(h)\n" + WARNS + "print(buf.getvalue(), end='')\n"
    )
    assert captured.stdout == "eslmatch.data.raw|WARNING|skipping broken.jpg: unreadable image\n"


def test_the_command_line_shows_each_level_as_before_and_restores_the_logger(capsys):
    log = logging.getLogger("eslmatch.test")
    before = logging.getLogger("eslmatch").level
    with cli_logging(logging.INFO):
        log.info("epoch 1/2: loss 0.5")
        note(log, "starting over")
        log.warning("2 lines ignored")
        log.debug("not shown")
    with cli_logging(logging.WARNING):
        log.info("not shown either")
        note(log, "nor this")
        log.error("shown")
    err = capsys.readouterr().err
    assert err == (
        "epoch 1/2: loss 0.5\neslmatch: note: starting over\neslmatch: warning: 2 lines ignored\neslmatch: error: shown\n"
    )
    assert logging.getLogger("eslmatch").level == before and not logging.getLogger("eslmatch").handlers
    record = logging.LogRecord("eslmatch.x", logging.DEBUG, __file__, 1, "why", None, None)
    assert CliFormatter().format(record) == "eslmatch: debug: eslmatch.x: why"
    assert logging.getLevelName(NOTE) == "NOTE"


def test_no_library_module_prints():
    """Library code speaks through its logger; only the command layer prints its results."""
    printing = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("commands/") or rel in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{rel}:{node.lineno}")
    assert printing == []
