"""The ``eslmatch`` command line. Entry points stay thin: the work lives in the library.

Each sub-command is a module in :mod:`eslmatch.commands` exposing ``register(subparsers)``,
which adds its parser and sets ``func`` (the handler, returning an exit code). Modules are
discovered, so adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import __version__, commands
from .errors import EslmatchError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eslmatch", description="Image-text matching with ESL.")
    p.add_argument("--version", action="version", version=f"eslmatch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    modules = [
        importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)
    ]
    for module in sorted(modules, key=lambda mod: (getattr(mod, "ORDER", 50), mod.__name__)):
        if hasattr(module, "register"):
            module.register(sub)
    return p


def error_line(exc: BaseException) -> str:
    """The one line printed for an error."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    if isinstance(exc, EslmatchError):
        return f"eslmatch: error: {msg}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"eslmatch: error: {exc.strerror or type(exc).__name__}: {exc.filename}"
    if isinstance(exc, MemoryError):
        return "eslmatch: error: out of memory (lower the batch size or the scoring memory budget)"
    return f"eslmatch: error: {type(exc).__name__}: {msg} (run with --debug for details)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("eslmatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line unless --debug
        if args.debug:
            raise
        print(error_line(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
