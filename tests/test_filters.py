"""The filter language: parsing, checking against field types, and its two renderings (a
parameterised SQLite clause, a Milvus expression) held to the Python reference."""

from __future__ import annotations

import itertools
import sqlite3

import pytest

from eslmatch.retrieval.filters import FilterError, check, matches, parse, to_milvus, to_sql

TYPES = {
    "id": "str",
    "folder": "str",
    "taken": "str",
    "tag": "str",
    "year": "int",
    "rating": "float",
    "starred": "bool",
}
RECORDS = [
    {
        "id": "a",
        "folder": "trips",
        "taken": "2024-05-01T10:00:00",
        "tag": "beach",
        "year": 2024,
        "rating": 4.5,
        "starred": True,
    },
    {
        "id": "b",
        "folder": "trips",
        "taken": "2023-12-31T23:59:59",
        "tag": "sea",
        "year": 2023,
        "rating": 3.0,
        "starred": False,
    },
    {"id": "c", "folder": "home", "tag": "cat", "year": 2019, "rating": 5.0},
    {"id": "d", "folder": "", "year": 2024},
    {"id": "x' or 1=1 --", "folder": 'we"ird\\', "starred": True},
]
FILTERS = [
    'folder == "trips" and taken >= "2024-01-01"',
    'tag in ["beach", "sea"]',
    "not starred",
    "starred",
    "starred == false",
    "year > 2019 and rating >= 4.5 or id == 'd'",
    '(year > 2019 and (rating >= 4.5)) or id == "d"',
    "not (folder == 'trips' or year < 2020)",
    'folder != "trips"',
    "rating < 5",
    "year <= 2023.5",
    'id == "x\' or 1=1 --"',
    'folder == "we\\"ird\\\\"',
    'tag in ["cat"] and not (taken > "2000")',
    "not not starred",
]


def sqlite_rows(flt) -> list[str]:
    """Evaluate the filter with SQLite over RECORDS (missing fields as NULL)."""
    db = sqlite3.connect(":memory:")
    cols = [c for c in TYPES if c != "id"]
    db.execute(f"CREATE TABLE t (id TEXT, {', '.join(cols)})")
    for r in RECORDS:
        values = [r.get(c) for c in ["id", *cols]]
        db.execute(
            f"INSERT INTO t VALUES ({', '.join('?' * len(values))})",
            [int(v) if isinstance(v, bool) else v for v in values],
        )
    sql, params = to_sql(flt, lambda f: f)
    return sorted(r[0] for r in db.execute(f"SELECT id FROM t WHERE {sql}", params))


@pytest.mark.parametrize("text", FILTERS)
def test_sql_equals_the_reference(text):
    flt = check(parse(text), TYPES)
    want = sorted(r["id"] for r in RECORDS if matches(flt, r))
    assert sqlite_rows(flt) == want


def test_semantics_of_missing_fields():
    assert [r["id"] for r in RECORDS if matches(parse("not starred"), r)] == ["b", "c", "d"]
    assert [r["id"] for r in RECORDS if matches(parse("starred"), r)] == ["a", "x' or 1=1 --"]
    # a missing value fails every comparison, != included; not() negates the whole test
    assert [r["id"] for r in RECORDS if matches(parse('tag != "cat"'), r)] == ["a", "b"]
    assert [r["id"] for r in RECORDS if matches(parse('not tag == "cat"'), r)] == ["a", "b", "d", "x' or 1=1 --"]
    # booleans are not numbers: starred == 1 is a type error, True never equals 1
    with pytest.raises(FilterError, match="'starred' is a bool field, compared with 1"):
        check(parse("starred == 1"), TYPES)


def test_precedence_and_grouping():
    a, b, c = (parse(t).node for t in ("x == 1", "y == 2", "z == 3"))
    assert parse("x == 1 or y == 2 and z == 3").node == type(parse("x == 1 or y == 2").node)(
        (a, type(parse("y == 2 and z == 3").node)((b, c)))
    )
    assert parse("not x == 1 and y == 2").node.args[0] == type(parse("not x == 1").node)(a)  # type: ignore[union-attr]
    assert parse("x==1").key == parse("  x  ==  1 ").key  # one canonical form


@pytest.mark.parametrize(
    "text, message",
    [
        ('folder == "trips" and', "expected a field name"),
        ("folder === 'x'", "column 10"),
        ("folder == trips", "expected a string or a number or 'true' or 'false' at column 11"),
        ("(year > 1", "expected '\\)' at column 10"),
        ("year > 1)", "expected the end of the filter at column 9"),
        ("tag in [1, ]", "column 12"),
        ("tag in beach", "expected '\\['"),
        ("x' or 1=1 --", "column 2"),
        ("folder == 'a\\q'", "unknown escape"),
        ("", "filter is empty"),
        ("year > 1e400", "out of range"),
        ("year > 99999999999999999999", "integer out of range \\(64-bit\\) at column 8"),  # issue 34 D5: was a 500
        ("year < -9223372036854775809", "integer out of range"),
        ("n == \u0663", "unexpected character"),  # an Arabic-Indic digit is no number
        ("a & b", "unexpected character '&' at column 3"),
        ("(" * 40 + "a" + ")" * 40, "nested deeper"),
    ],
)
def test_syntax_errors_name_the_column(text, message):
    with pytest.raises(FilterError, match=message):
        parse(text)


def test_unknown_fields_list_the_known_ones_and_types_are_checked():
    with pytest.raises(
        FilterError, match=r"unknown field 'colour' \(known fields: folder, id, rating, starred, tag, taken, year\)"
    ):
        check(parse('colour == "red"'), TYPES)
    with pytest.raises(FilterError, match="'year' is an int field, compared with \"2024\""):
        check(parse('year == "2024"'), TYPES)
    with pytest.raises(FilterError, match="'folder' is a str field, compared with true"):
        check(parse("folder"), TYPES)
    with pytest.raises(FilterError, match="use == or !="):
        check(parse("starred > false"), TYPES)
    assert check(parse("rating == 4"), TYPES)  # an int literal for a float field


def test_values_are_never_pasted_into_sql():
    flt = parse('id == "x\' or 1=1 --" or folder in [\'a; DROP TABLE t\', "b"]')
    sql, params = to_sql(flt, lambda f: f)
    assert "DROP" not in sql and "1=1" not in sql and sql.count("?") == 3
    assert params == ["x' or 1=1 --", "a; DROP TABLE t", "b"]
    assert sqlite_rows(flt) == ["x' or 1=1 --"]


def test_milvus_rendering_quotes_every_value():
    flt = parse('id == "a\\" or row >= 0 or \\"" and folder in ["x", "y\\\\"] and not starred and year > -3')
    expr = to_milvus(flt, lambda f: {"id": "item_id"}.get(f, f), lambda f: f != "id")
    assert expr == (
        '((item_id == "a\\" or row >= 0 or \\"") and (exists folder and folder in ["x", "y\\\\"]) and '
        "(not (exists starred and starred == true)) and (exists year and year > -3))"
    )


def test_every_operator_against_sqlite():
    for field, value in itertools.product(("year", "rating", "taken"), (2020, 4.5, "2024")):
        for op in ("==", "!=", "<", "<=", ">", ">="):
            text = f"{field} {op} {value!r}".replace("'", '"')
            try:
                flt = check(parse(text), TYPES)
            except FilterError:
                continue  # a type mismatch, refused
            assert sqlite_rows(flt) == sorted(r["id"] for r in RECORDS if matches(flt, r)), text
