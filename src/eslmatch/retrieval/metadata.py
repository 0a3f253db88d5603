"""Item metadata: the fields of a gallery, metadata files, and what photos record by themselves.

Every item has ``id``, ``path`` and ``added`` (ISO time of its addition); metadata adds fields
of one type each (``str``, ``int``, ``float`` or ``bool``), fixed the first time a field
appears (an ``int`` value is accepted for a ``float`` field). Photos record ``folder`` (their
directory relative to the folder added, ``""`` at its top) and, when the file has one,
``taken`` (EXIF DateTimeOriginal as ISO text, ``2024-05-01T14:03:22``).

A metadata file is JSON Lines (one object per line: ``{"id": "...", "field": value, ...}``)
or CSV with an ``id`` column (values typed by the gallery's field types, else inferred per
column: all integers -> int, all numbers -> float, all true/false -> bool, else str; an empty
cell is no value). ``null`` (JSON) removes a field of an item in an update.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from ..errors import InvalidInput, with_article
from .filters import TYPES, Value, value_type

BUILTIN = ("id", "path", "added")
CAPTION = "caption"
RESERVED = (*BUILTIN, CAPTION, "row", "deleted", "score", "item_id", "length", "vec", "key")
MAX_FIELDS = 256
MAX_VALUE_CHARS = 65535
MAX_FILE_BYTES = 1 << 30
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_EXIF_DATE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
EXIF_DATETIME_ORIGINAL = 0x9003
EXIF_IFD = 0x8769

Metadata = dict[str, Any]


class MetadataError(InvalidInput):
    """A metadata file or value that cannot be used (one line naming the file and line)."""


def now() -> str:
    """The current UTC time as ISO text, to the second (an item's ``added``)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def check_field_name(name: str, where: str = "metadata") -> str:
    if not isinstance(name, str) or not _FIELD.fullmatch(name):
        raise MetadataError(
            f"{where}: field name {name!r} is not valid (letters, digits and '_', not starting with a digit, "
            "at most 64 characters)"
        )
    if name in RESERVED:
        raise MetadataError(f"{where}: {name!r} is a reserved field name ({', '.join(RESERVED)})")
    return name


def check_value(value: object, where: str) -> Value | None:
    """``value`` if it is a storable metadata value (finite numbers, strings without NUL)."""
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):  # bool is an int (what value_type accepts)
        raise MetadataError(f"{where}: values are strings, integers, floats or booleans, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MetadataError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise MetadataError(f"{where}: {value} does not fit a 64-bit integer")
    if isinstance(value, str) and (len(value) > MAX_VALUE_CHARS or "\0" in value):
        raise MetadataError(f"{where}: a string value holds NUL or is longer than {MAX_VALUE_CHARS} characters")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MetadataError(f"{where}: a string value is not valid Unicode (a lone surrogate)") from None
    return value


def merge_types(types: Mapping[str, str], records: Iterable[Metadata], where: str = "metadata") -> dict[str, str]:
    """The field types after adding ``records``: known fields keep their type (a value of
    another type is an error naming the field and the id), new fields take their values' type."""
    out = dict(types)
    fresh: set[str] = set()  # fields first seen here: ints and floats among their values make a float
    for rec in records:
        for name, value in rec.items():
            if name == "id" or value is None:
                continue
            vt = value_type(value)
            have = out.get(name)
            if have is None:
                check_field_name(name, where)
                out[name] = vt
                fresh.add(name)
            elif name in fresh and {have, vt} == {"int", "float"}:
                out[name] = "float"
            elif have != vt and not (have == "float" and vt == "int"):
                raise MetadataError(
                    f"{where}: field {name!r} of item {rec.get('id')!r} is {with_article(vt)}, the gallery's {name!r} is {with_article(have)}"
                )
    if len(out) > MAX_FIELDS:
        raise MetadataError(f"{where}: more than {MAX_FIELDS} metadata fields")
    return out


# ---------------------------------------------------------------------- files
def read_metadata(path: str | Path, types: Mapping[str, str] | None = None) -> dict[str, Metadata]:
    """``{id: {field: value}}`` from a JSON Lines or CSV file (see the module doc).

    ``types``: the gallery's field types, used to read CSV cells. Errors name the file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise MetadataError(f"{p}: no such metadata file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise MetadataError(f"{p}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MetadataError(f"{p}: unreadable ({exc.strerror or exc})") from None
    if not text.strip():
        raise MetadataError(f"{p}: empty metadata file")
    first = text.lstrip()[:1]
    records = _read_jsonl(p, text) if first == "{" or p.suffix.lower() in (".jsonl", ".json", ".ndjson") else None
    if records is None:
        records = _read_csv(p, text, types or {})
    out = metadata_records(((f"{p}:{line}", rec) for line, rec in records), types, str(p))
    if not out:
        raise MetadataError(f"{p}: no records")
    return out


def metadata_records(
    records: Iterable[tuple[str, Mapping[str, Any]]], types: Mapping[str, str] | None = None, where: str = "metadata"
) -> dict[str, Metadata]:
    """``{id: fields}`` of ``(where, {"id": ..., field: value})`` records, each checked (the one
    check of metadata, from a file or from an upload's form: names, types, 64-bit integers,
    finite numbers, strings without NUL or lone surrogates)."""
    out: dict[str, Metadata] = {}
    for at, rec in records:
        item = rec.get("id")
        if not isinstance(item, str) or not item:
            raise MetadataError(f"{at}: every record needs a non-empty string 'id'")
        check_value(item, f"{at}: id")
        if item in out:
            raise MetadataError(f"{at}: id {item!r} appears twice")
        clean: Metadata = {}
        for name, value in rec.items():
            if name == "id":
                continue
            check_field_name(name, at)
            clean[name] = check_value(value, f"{at}: field {name!r}")
        out[item] = clean
    merge_types(types or {}, ({"id": k, **v} for k, v in out.items()), where)
    return out


def parse_json(text: str, where: str) -> Any:
    """JSON text as Python values: ``NaN`` / ``Infinity`` refused, nesting too deep refused, in one line."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise MetadataError(f"{where}: nested too deeply") from None
    except ValueError as exc:
        raise MetadataError(f"{where}: not a JSON object ({exc})") from None


def _read_jsonl(p: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = parse_json(line, f"{p}:{n}")
        if not isinstance(rec, dict):
            raise MetadataError(f"{p}:{n}: not a JSON object")
        out.append((n, rec))
    return out


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a finite number")


def _read_csv(p: Path, text: str, types: Mapping[str, str]) -> list[tuple[int, dict[str, Value]]]:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise MetadataError(f"{p}: not CSV ({exc})") from None
    header = [h.strip() for h in rows[0]]
    if "id" not in header:
        raise MetadataError(f"{p}: a CSV metadata file needs an 'id' column (its header: {', '.join(header)})")
    if len(set(header)) != len(header):
        raise MetadataError(f"{p}: a column name appears twice in the header")
    body = [(n, r) for n, r in enumerate(rows[1:], 2) if any(c.strip() for c in r)]
    for n, r in body:
        if len(r) != len(header):
            raise MetadataError(f"{p}:{n}: {len(r)} cells, the header has {len(header)}")
    column_types = {h: types.get(h) or _infer([r[j] for _, r in body]) for j, h in enumerate(header) if h != "id"}
    out = []
    for n, r in body:
        rec: dict[str, Value] = {"id": r[header.index("id")].strip()}
        for j, h in enumerate(header):
            if h != "id" and r[j].strip():
                rec[h] = _cell(r[j].strip(), column_types[h], f"{p}:{n}: column {h!r}")
        out.append((n, rec))
    return out


def _infer(cells: list[str]) -> str:
    filled = [c.strip() for c in cells if c.strip()]
    if not filled:
        return "str"
    if all(re.fullmatch(r"[-+]?\d+", c) for c in filled):
        return "int"
    if all(_is_float(c) for c in filled):
        return "float"
    if all(c.lower() in ("true", "false") for c in filled):
        return "bool"
    return "str"


def _is_float(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _cell(cell: str, kind: str, where: str) -> Value:
    if kind == "str":
        return cell
    if kind == "bool":
        if cell.lower() not in ("true", "false"):
            raise MetadataError(f"{where}: {cell!r} is not true or false (a bool field)")
        return cell.lower() == "true"
    try:
        return int(cell) if kind == "int" else float(cell)
    except ValueError:
        raise MetadataError(f"{where}: {cell!r} is not a{'n' if kind == 'int' else ''} {kind}") from None


# ---------------------------------------------------------------------- photos
def folder_of(relative: str) -> str:
    """The directory of a relative path (``"trips/2024/a.jpg"`` -> ``"trips/2024"``; top -> ``""``)."""
    parent = Path(relative).parent.as_posix()
    return "" if parent == "." else parent


def exif_taken(path: str | Path) -> str | None:
    """EXIF DateTimeOriginal of an image file as ISO text, or ``None`` (no EXIF, unreadable).

    Reads only the file's header (PIL opens lazily)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            exif = im.getexif()
            raw = exif.get_ifd(EXIF_IFD).get(EXIF_DATETIME_ORIGINAL) or exif.get(EXIF_DATETIME_ORIGINAL)
    except Exception:  # noqa: BLE001 - any unreadable header simply has no date
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    m = _EXIF_DATE.match(str(raw or "").strip())
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(v) for v in m.groups())
    try:
        return datetime.datetime(y, mo, d, h, mi, s).isoformat()
    except ValueError:
        return None


def field_types_text(types: Mapping[str, str]) -> str:
    """``folder (str), taken (str), ...`` for messages and ``index info``."""
    return ", ".join(f"{k} ({v})" for k, v in sorted(types.items())) or "none"


__all__ = [
    "BUILTIN",
    "TYPES",
    "MetadataError",
    "check_field_name",
    "exif_taken",
    "folder_of",
    "merge_types",
    "read_metadata",
]
