"""The filter language of gallery searches and deletes, parsed by our code.

    folder == "trips" and taken >= "2024-01-01"
    tag in ["beach", "sea"] or not starred
    (year > 2019 and rating >= 4.5) or id == "IMG_0042"

Grammar (precedence: ``not`` > ``and`` > ``or``; parentheses group)::

    expr    := term ("or" term)*
    term    := factor ("and" factor)*
    factor  := "not" factor | "(" expr ")" | field op value | field "in" "[" value ("," value)* "]" | field
    op      := "==" | "!=" | "<" | "<=" | ">" | ">="
    value   := "string" | 'string' | integer | float | true | false

A bare ``field`` is ``field == true`` (boolean fields only). Logic is two-valued: an item that
lacks a field fails every comparison on it, so ``not starred`` holds for items whose
``starred`` is false or absent. A filter is parsed once into an AST (:class:`Filter`), checked
against the gallery's field types (:func:`check`), and then rendered for each store: a
parameterised SQLite ``WHERE`` clause (:func:`to_sql`: values are always bound parameters) or
a Milvus expression (:func:`to_milvus`: values are rendered as literals by our code, never the
user's text). :func:`matches` evaluates it on one record in Python (the reference the tests
hold both stores to).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..errors import EslmatchError, InvalidInput, with_article

OPS = ("==", "!=", "<", "<=", ">", ">=")
TYPES = ("str", "int", "float", "bool")
MAX_FILTER_CHARS = 4096
MAX_IN_VALUES = 1024
MAX_DEPTH = 32
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
    | (?P<op>==|!=|<=|>=|<|>)
    | (?P<punct>[()\[\],])
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE | re.ASCII,  # digits are 0-9 (not any Unicode digit: `n == ٣` is no number)
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false"}
Value = Union[str, int, float, bool]


class FilterError(InvalidInput):
    """A filter that does not parse, names an unknown field, or compares a field with a value
    of another type (one line, with the column where it went wrong)."""


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Value


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Not:
    arg: Node


@dataclass(frozen=True)
class And:
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    args: tuple[Node, ...]


Node = Union[Compare, In, Not, And, Or]


@dataclass(frozen=True)
class Filter:
    """A parsed filter: its AST and the text it came from (for messages and cache keys)."""

    node: Node
    text: str

    @property
    def key(self) -> str:
        """A canonical form: two spellings of the same filter share it (e.g. for caches)."""
        return repr(self.node)

    def fields(self) -> set[str]:
        return _fields(self.node)


# ---------------------------------------------------------------------- parsing
@dataclass
class _Tok:
    kind: str
    text: str
    col: int  # 1-based


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise FilterError(f"filter: unexpected character {text[i]!r} at column {i + 1}")
        kind = m.lastgroup or ""
        tok = m.group(kind)
        col = m.start(kind) + 1
        if (kind == "word" and tok in _KEYWORDS) or kind == "punct":
            kind = tok
        out.append(_Tok(kind, tok, col))
        i = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, *kinds: str) -> _Tok:
        tok = self.peek()
        if tok.kind not in kinds:
            want = " or ".join(repr(k) if k not in ("word", "str", "num", "end") else _NAMES[k] for k in kinds)
            got = "the end of the filter" if tok.kind == "end" else repr(tok.text)
            raise FilterError(f"filter: expected {want} at column {tok.col}, found {got}")
        self.i += 1
        return tok

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels at column {self.peek().col}")
        args = [self.term()]
        while self.peek().kind == "or":
            self.i += 1
            args.append(self.term())
        self.depth -= 1
        return args[0] if len(args) == 1 else Or(tuple(args))

    def term(self) -> Node:
        args = [self.factor()]
        while self.peek().kind == "and":
            self.i += 1
            args.append(self.factor())
        return args[0] if len(args) == 1 else And(tuple(args))

    def factor(self) -> Node:
        tok = self.peek()
        if tok.kind == "not":
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels at column {tok.col}")
            negated = Not(self.factor())
            self.depth -= 1
            return negated
        if tok.kind == "(":
            self.i += 1
            node = self.expr()
            self.take(")")
            return node
        name = self.take("word").text
        nxt = self.peek()
        if nxt.kind == "op":
            self.i += 1
            return Compare(name, nxt.text, self.value())
        if nxt.kind == "in":
            self.i += 1
            self.take("[")
            values = [self.value()]
            while self.peek().kind == ",":
                self.i += 1
                values.append(self.value())
            self.take("]")
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"filter: more than {MAX_IN_VALUES} values in the list of {name!r}")
            return In(name, tuple(values))
        return Compare(name, "==", True)

    def value(self) -> Value:
        tok = self.take("str", "num", "true", "false")
        if tok.kind == "true":
            return True
        if tok.kind == "false":
            return False
        if tok.kind == "num":
            if re.fullmatch(r"[-+]?[0-9]+", tok.text):
                number_int = int(tok.text)
                if not -(2**63) <= number_int < 2**63:  # fields hold 64-bit integers (SQLite, Milvus)
                    raise FilterError(f"filter: integer out of range (64-bit) at column {tok.col}")
                return number_int
            number = float(tok.text)
            if not math.isfinite(number):
                raise FilterError(f"filter: number out of range at column {tok.col}")
            return number
        return _unquote(tok)


_NAMES = {"word": "a field name", "str": "a string", "num": "a number", "end": "the end of the filter"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unquote(tok: _Tok) -> str:
    body, out, i = tok.text[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise FilterError(f"filter: unknown escape \\{nxt} in the string at column {tok.col}")
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse(text: str) -> Filter:
    """Parse a filter; :class:`FilterError` names the column of a syntax error."""
    if not isinstance(text, str):
        raise FilterError(f"a filter is a string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter is too long ({len(text)} characters, at most {MAX_FILTER_CHARS})")
    if not text.strip():
        raise FilterError("filter is empty")
    parser = _Parser(text)
    node = parser.expr()
    parser.take("end")
    return Filter(node, text)


def as_filter(where: str | Filter | None) -> Filter | None:
    """``None``, a parsed :class:`Filter`, or a filter string to parse."""
    if where is None or isinstance(where, Filter):
        return where
    return parse(where)


# ---------------------------------------------------------------------- checking
def _fields(node: Node) -> set[str]:
    if isinstance(node, (Compare, In)):
        return {node.field}
    if isinstance(node, Not):
        return _fields(node.arg)
    return set().union(*(_fields(a) for a in node.args))


def value_type(value: object) -> str:
    """``"bool"``, ``"int"``, ``"float"`` or ``"str"`` for a metadata value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    raise EslmatchError(f"metadata values are strings, integers, floats or booleans, not {type(value).__name__}")


def _compatible(field_type: str, value: Value) -> bool:
    vt = value_type(value)
    if field_type in ("int", "float"):
        return vt in ("int", "float")
    return vt == field_type


def check(flt: Filter, types: Mapping[str, str]) -> Filter:
    """Refuse a filter naming a field the gallery lacks (listing the known ones), comparing a
    field with a value of another type, or ordering booleans; returns ``flt``."""
    for name in sorted(flt.fields()):
        if name not in types:
            known = ", ".join(sorted(types)) or "none"
            raise FilterError(f"filter: unknown field {name!r} (known fields: {known})")
    _check_node(flt.node, types)
    return flt


def _check_node(node: Node, types: Mapping[str, str]) -> None:
    if isinstance(node, Compare):
        ft = types[node.field]
        if not _compatible(ft, node.value):
            raise FilterError(
                f"filter: {node.field!r} is {with_article(ft)} field, compared with {_literal(node.value)} ({value_type(node.value)})"
            )
        if ft == "bool" and node.op not in ("==", "!="):
            raise FilterError(f"filter: {node.field!r} is a bool field: use == or !=, not {node.op}")
    elif isinstance(node, In):
        for v in node.values:
            if not _compatible(types[node.field], v):
                raise FilterError(
                    f"filter: {node.field!r} is {with_article(types[node.field])} field, its list holds {_literal(v)} ({value_type(v)})"
                )
    elif isinstance(node, Not):
        _check_node(node.arg, types)
    else:
        for a in node.args:
            _check_node(a, types)


# ---------------------------------------------------------------------- evaluation (reference)
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def matches(flt: Filter | Node, record: Mapping[str, Value | None]) -> bool:
    """Whether ``record`` (field -> value; absent fields missing or ``None``) satisfies the filter."""
    node = flt.node if isinstance(flt, Filter) else flt
    if isinstance(node, Compare):
        have = record.get(node.field)
        if have is None or isinstance(have, bool) != isinstance(node.value, bool):
            return False
        return _COMPARE[node.op](have, node.value)
    if isinstance(node, In):
        have = record.get(node.field)
        return have is not None and any(
            isinstance(have, bool) == isinstance(v, bool) and have == v for v in node.values
        )
    if isinstance(node, Not):
        return not matches(node.arg, record)
    if isinstance(node, And):
        return all(matches(a, record) for a in node.args)
    return any(matches(a, record) for a in node.args)


# ---------------------------------------------------------------------- SQLite
def to_sql(flt: Filter, column: Callable[[str], str]) -> tuple[str, list[str | int | float]]:
    """A parameterised SQLite boolean expression and its parameters.

    ``column(field)`` returns the column's SQL name (our code's names, never user text). Each
    comparison is wrapped in ``COALESCE(..., 0)`` so a missing value (NULL) is false and
    ``NOT`` stays two-valued; booleans are bound as 0 / 1.
    """
    params: list[str | int | float] = []

    def render(node: Node) -> str:
        if isinstance(node, Compare):
            params.append(_sql_value(node.value))
            return f"COALESCE({column(node.field)} {node.op.replace('==', '=')} ?, 0)"
        if isinstance(node, In):
            params.extend(_sql_value(v) for v in node.values)
            return f"COALESCE({column(node.field)} IN ({', '.join('?' * len(node.values))}), 0)"
        if isinstance(node, Not):
            return f"(NOT {render(node.arg)})"
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(render(a) for a in node.args) + ")"

    return render(flt.node), params


def _sql_value(value: Value) -> str | int | float:
    return int(value) if isinstance(value, bool) else value


# ---------------------------------------------------------------------- Milvus
def to_milvus(flt: Filter, name: Callable[[str], str], dynamic: Callable[[str], bool]) -> str:
    """A Milvus boolean expression of the filter.

    ``name(field)`` is the Milvus field (our names); ``dynamic(field)``: the field lives in the
    collection's dynamic (JSON) part, so each comparison is guarded by ``exists`` (a missing
    value is false, and ``not`` stays two-valued). Values are rendered by :func:`_literal`.
    """

    def render(node: Node) -> str:
        if isinstance(node, (Compare, In)):
            f = name(node.field)
            if isinstance(node, Compare):
                test = f"{f} {node.op} {_literal(node.value)}"
            else:
                test = f"{f} in [{', '.join(_literal(v) for v in node.values)}]"
            return f"(exists {f} and {test})" if dynamic(node.field) else f"({test})"
        if isinstance(node, Not):
            return f"(not {render(node.arg)})"
        joiner = " and " if isinstance(node, And) else " or "
        return "(" + joiner.join(render(a) for a in node.args) + ")"

    return render(flt.node)


def _literal(value: Value) -> str:
    """A value as a literal of Milvus's expression language (and of ours): strings JSON-quoted
    (every quote and backslash escaped), booleans ``true`` / ``false``, numbers in full."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


parse_filter = parse  # the package's name for it (eslmatch.retrieval.parse_filter)
