"""Reading the benchmarks' text files, every failure one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EslmatchError


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path`` (``what`` names the kind of file in errors)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EslmatchError(f"{p}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EslmatchError(f"{p}: cannot read the {what} ({exc})") from exc
    except ValueError as exc:
        raise EslmatchError(f"{p}: not valid JSON ({exc})") from exc


def text_lines(path: str | Path) -> list[str]:
    """Stripped UTF-8 lines of ``path``, blank ones kept as ``""`` (numbering stays the file's)."""
    p = Path(path)
    try:
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EslmatchError(f"{p}: cannot read ({exc})") from exc
