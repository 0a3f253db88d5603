"""The ``eslmatch`` command line. Entry points stay thin: the work lives in the library.

Each sub-command is a module in :mod:`eslmatch.commands` exposing ``register(subparsers)``,
which adds its parser and sets ``func`` (the handler, returning an exit code). Modules are
discovered, so adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Sequence

from . import __version__, commands
from .errors import EslmatchError, JobFailed
from .utils.messages import cli_logging


def command_names() -> list[str]:
    """The sub-commands: one module each in :mod:`eslmatch.commands`, named as the command
    (listed without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone: a call that names its command
    imports that module only, so the others' imports cost nothing (``eslmatch search`` checks
    its query before torch is imported)."""
    p = argparse.ArgumentParser(prog="eslmatch", description="Image-text matching with ESL.")
    p.add_argument("--version", action="version", version=f"eslmatch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors, and every message with its source")
    p.add_argument("--quiet", action="store_true", help="show warnings and errors only (no progress lines or notes)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    names = [command] if command in command_names() else command_names()
    modules = [importlib.import_module(f"{commands.__name__}.{name}") for name in names]
    for module in sorted(modules, key=lambda mod: (getattr(mod, "ORDER", 50), mod.__name__)):
        if hasattr(module, "register"):
            module.register(sub)
    return p


_TOP_LEVEL = ("--debug", "--quiet")


def log_level(argv: Sequence[str]) -> int:
    """What the command shows on stderr: progress lines, notes and warnings; warnings only
    with ``--quiet``; everything with ``--debug``. A torchrun rank other than 0 shows errors
    only: rank 0 speaks for the job (the ranks see the same inputs)."""
    top = set(argv[: next((i for i, a in enumerate(argv) if a not in _TOP_LEVEL), len(argv))])
    if os.environ.get("RANK", "0") not in ("", "0"):
        return logging.ERROR
    if "--debug" in top:
        return logging.DEBUG
    return logging.WARNING if "--quiet" in top else logging.INFO


def named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first argument that is not one of the top-level options."""
    for arg in argv:
        if arg in _TOP_LEVEL:
            continue
        return None if arg.startswith("-") else arg
    return None


# numpy's answer to any file that is not an .npy/.npz (random bytes, another format) when
# pickles are refused; its advice to load the file unsafely is not ours to give.
_NUMPY_PICKLE = re.compile(
    r"This file contains pickled \(object\) data\. If you trust the file[^)]*?(`pickle\.load\(\)`\.|$)"
)
_NOT_NUMPY = "not an .npy / .npz file (random bytes, another format or a pickle; pickles are never loaded)"


def error_line(exc: BaseException) -> str:
    """The one line printed for an error."""
    text = str(exc).strip()
    msg = _NUMPY_PICKLE.sub(_NOT_NUMPY, text.splitlines()[0] if text else "")
    if isinstance(exc, EslmatchError):
        return f"eslmatch: error: {msg}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"eslmatch: error: {exc.strerror or type(exc).__name__}: {exc.filename}"
    if isinstance(exc, MemoryError):
        return "eslmatch: error: out of memory (lower the batch size or the scoring memory budget)"
    return f"eslmatch: error: {type(exc).__name__}: {msg} (run with --debug for details)"


def check_argv(argv: Sequence[str]) -> None:
    """Refuse, in one line, an argument that is not valid UTF-8.

    Python decodes undecodable argv bytes into lone surrogates (``'\\udced'``); such a string
    cannot be tokenised, written to a JSON manifest or printed, so it is refused before
    anything else runs, whether it is a query or a file name.
    """
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(arg).decode("ascii", "backslashreplace")
            raise EslmatchError(
                f"argument {i} ({shown}) is not valid UTF-8 (eslmatch reads UTF-8 text and file names)"
            ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code: 0, 1 (an error, one line on stderr), 2 (usage), 130
    (interrupted: Ctrl-C) or 141 (stdout closed early, e.g. ``| head``)."""
    args: argparse.Namespace | None = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        check_argv(argv)
        parser = build_parser(named_command(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with cli_logging(log_level(argv)):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except KeyboardInterrupt:
        print("eslmatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except Exception as exc:  # every error is one line unless --debug
        if args is not None and args.debug:
            raise
        if not (isinstance(exc, JobFailed) and exc.reported):  # else rank 0 logged it; every rank exits 1
            print(error_line(exc), file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after the reader closed it, so that the interpreter's final
    flush does not print a second BrokenPipeError (the approach of Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed): nothing to flush
        pass


def run() -> None:
    """The process entry point (the ``eslmatch`` script, ``python -m eslmatch.cli``): exit with
    :func:`main`'s code. After Ctrl-C it leaves at once with 130: through ``sys.exit`` about 1
    run in 10 ended killed by SIGINT (status -2) although ``main`` had handled the interrupt
    and printed its line (an interrupt landing inside torch's import). Standard output is
    line-buffered, so each line reaches a pipe (``eslmatch demo | tee log``) when printed,
    not minutes later in one block."""
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):  # replaced or detached by an embedding program
        pass
    code = main()
    if code == 130:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
