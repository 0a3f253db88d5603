"""One channel for what the library says: the standard ``logging`` loggers under ``eslmatch``.

Library modules log through ``logging.getLogger(__name__)`` and never print: a Python caller
silences, captures or redirects them as any other library's (``logging.getLogger("eslmatch")
.setLevel(logging.ERROR)``). Unconfigured, Python shows warnings and errors on stderr and
drops the rest. Levels:

- ``INFO``: a progress line (``epoch 3/30: loss ...``);
- :data:`NOTE`: something the user may want to act on, that is not a problem
  (``partial results ... are from other inputs; starting over``);
- ``WARNING``: something probably wrong that did not stop the work (caption lines ignored).

The command line shows ``INFO`` and up on stderr, each level as it always looked
(``eslmatch: note: ...``); ``--quiet`` shows warnings only, ``--debug`` everything, with the
logger's name.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

ROOT = "eslmatch"
NOTE = 25  # between INFO and WARNING
logging.addLevelName(NOTE, "NOTE")


def note(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at :data:`NOTE`."""
    logger.log(NOTE, message)


class CliFormatter(logging.Formatter):
    """A record as the command line prints it: a progress line as it is, anything else after
    ``eslmatch: <level>:``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"eslmatch: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"eslmatch: warning: {msg}"
        if record.levelno >= NOTE:
            return f"eslmatch: note: {msg}"
        if record.levelno >= logging.INFO:
            return msg
        return f"eslmatch: debug: {record.name}: {msg}"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (a test's capture,
    a redirected stream), flushed per record."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO) -> Iterator[None]:
    """While inside: the ``eslmatch`` loggers print to stderr at ``level`` and up, as the
    command line shows them. The logger's earlier level and handlers come back after, so a
    program (or a test) calling :func:`eslmatch.cli.main` twice sees no stale setting."""
    logger = logging.getLogger(ROOT)
    handler = _Stderr()
    handler.setFormatter(CliFormatter())
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
