"""The catalogue of a file gallery: one SQLite database (standard library, WAL mode).

``catalog.sqlite`` holds what changes while a gallery lives, so that every operation is one
transaction and readers in other processes see a consistent snapshot:

- ``items``: one row per stored item: ``row`` (its position in the shards and the FAISS
  index), ``id``, ``path``, ``caption`` (caption indexes), ``added``, ``deleted`` (a deleted
  item stays until :meth:`Catalog.renumber` drops it at compaction), and one column per
  metadata field (``f1``, ``f2``, ... named by our code, never by the user). Live ids are
  unique (a partial unique index).
- ``fields``: each metadata field's name, type and column.
- ``state``: JSON values: ``generation`` (incremented by every committed change: readers poll
  it), ``layout`` (the shards, the FAISS file and how many rows it covers, the sources),
  set in the same transaction as the items it describes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import EslmatchError
from ..filters import Filter, Value, check, to_sql
from ..metadata import Metadata
from ..records import Layout, LibraryState
from ..store import Record

CATALOG = "catalog.sqlite"
SCHEMA_VERSION = 1
_SQL_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}
_BUSY_MS = 30000
_CHUNK = 900  # bound parameters per statement (SQLite's default limit is 999 on old builds)


_Key = tuple[int, tuple[int, int] | None]  # (generation, identity): what cached field types were read from


class CatalogError(EslmatchError):
    """A catalogue that is missing, damaged, or busy beyond the timeout."""


class Catalog:
    """``catalog.sqlite`` of a gallery folder; one connection per thread."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CatalogError(f"{self.path}: missing (not a gallery, or a damaged one)")
        self._local = threading.local()
        # the fields' columns, keyed by the file read and its generation (a rebuilt gallery
        # restarts its generation, and may give a column to another field, or to none)
        self._types: tuple[_Key, dict[str, tuple[str, str]]] | None = None
        self._all: tuple[_Key, dict[str, str]] | None = None
        if create:
            self._create()
        else:
            self._check()

    # ------------------------------------------------------------------ connections
    def identity(self) -> tuple[int, int] | None:
        """The catalogue file this thread reads: ``(device, inode)`` (``None``: not opened yet)."""
        return getattr(self._local, "ident", None)

    def _follow_replacement(self) -> None:
        """Reopen this thread's connection when the file at :attr:`path` is another one (the
        gallery was rebuilt in place: an old connection would read the old gallery for ever)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.in_transaction:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return  # being replaced: read what this connection holds, the next call looks again
        if (st.st_dev, st.st_ino) != self._local.ident:
            self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            except sqlite3.Error as exc:
                raise CatalogError(f"{self.path}: cannot open the catalogue ({exc})") from None
            self._local.conn = conn
            st = os.stat(self.path)
            self._local.ident = (st.st_dev, st.st_ino)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise CatalogError(f"{self.path}: {what} failed ({exc})") from exc

    @contextlib.contextmanager
    def read(self) -> Iterator[Catalog]:
        """A read transaction: every query inside sees one committed state (a snapshot)."""
        self._follow_replacement()
        conn = self.conn
        if conn.in_transaction:
            yield self
            return
        with self._errors("reading"):
            conn.execute("BEGIN")
        try:
            yield self
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[Catalog]:
        """One write transaction (exclusive among writers); commits with the generation
        incremented, or rolls back on any error."""
        conn = self.conn
        with self._errors("starting a write"):
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            conn.execute("UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            self._types = None

    # ------------------------------------------------------------------ schema
    def _create(self) -> None:
        conn = self.conn
        with self._errors("creating the catalogue"):
            conn.executescript(
                """
                BEGIN;
                CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE fields (name TEXT PRIMARY KEY, type TEXT NOT NULL, col TEXT NOT NULL UNIQUE);
                CREATE TABLE items (
                    row INTEGER PRIMARY KEY,
                    id TEXT NOT NULL,
                    path TEXT NOT NULL DEFAULT '',
                    caption TEXT,
                    added TEXT NOT NULL,
                    deleted INTEGER NOT NULL DEFAULT 0
                );
                CREATE UNIQUE INDEX items_live_id ON items(id) WHERE deleted = 0;
                CREATE INDEX items_deleted ON items(row) WHERE deleted = 1;
                COMMIT;
                """
            )
            conn.executemany(
                "INSERT INTO state VALUES (?, ?)",
                [("generation", "0"), ("schema", str(SCHEMA_VERSION)), ("layout", "{}")],
            )

    def _check(self) -> None:
        with self._errors("opening the catalogue"):
            row = self.conn.execute("SELECT value FROM state WHERE key = 'schema'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise CatalogError(f"{self.path}: catalogue schema {row and row[0]!r} is not supported by this eslmatch")

    def types(self) -> dict[str, str]:
        """Each metadata field's type (``str``, ``int``, ``float``, ``bool``)."""
        return {k: v[0] for k, v in self._columns().items()}

    def _columns(self) -> dict[str, tuple[str, str]]:
        key = (self.generation(), self.identity())
        if self._types is None or self._types[0] != key:
            rows = self.conn.execute("SELECT name, type, col FROM fields ORDER BY col").fetchall()
            self._types = (key, {n: (t, c) for n, t, c in rows})
        return self._types[1]

    def add_fields(self, types: Mapping[str, str]) -> None:
        """Create the columns of new fields (inside :meth:`write`)."""
        have = self._columns()
        n = len(have)
        for name, kind in sorted(types.items()):
            if name in have:
                continue
            n += 1
            col = f"f{n}"
            self.conn.execute(f"ALTER TABLE items ADD COLUMN {col} {_SQL_TYPES[kind]}")
            self.conn.execute(f"CREATE INDEX items_{col} ON items({col})")
            self.conn.execute("INSERT INTO fields VALUES (?, ?, ?)", (name, kind, col))
        self._types = None

    def column(self, name: str) -> str:
        """The SQL column of a field (builtins and metadata); our names only."""
        if name in ("id", "path", "added", "caption"):
            return name
        return self._columns()[name][1]

    # ------------------------------------------------------------------ state
    def generation(self) -> int:
        with self._errors("reading the generation"):
            row = self.conn.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()
        return int(row[0])

    def layout(self) -> Layout:
        with self._errors("reading the layout"):
            row = self.conn.execute("SELECT value FROM state WHERE key = 'layout'").fetchone()
        layout: Layout = json.loads(row[0])
        return layout

    def set_layout(self, layout: Mapping[str, Any]) -> None:
        """Set the layout (inside :meth:`write`): a :class:`~..records.Layout` (typed so once
        ``store.py`` and ``upgrade.py`` build theirs as one)."""
        self.conn.execute("UPDATE state SET value = ? WHERE key = 'layout'", (json.dumps(layout, sort_keys=True),))

    def library(self) -> LibraryState:
        """The photo library's state kept beside the items (``{}`` when never set)."""
        with self._errors("reading library"):
            row = self.conn.execute("SELECT value FROM state WHERE key = 'library'").fetchone()
        state: LibraryState = json.loads(row[0]) if row else {}
        return state

    def set_state(self, key: str, value: Mapping[str, object]) -> None:
        """Set :meth:`state` ``key`` (inside :meth:`write`)."""
        self.conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------ counts and lookups
    def counts(self) -> tuple[int, int]:
        """``(live items, deleted items not yet compacted)``."""
        with self._errors("counting items"):
            live, deleted = self.conn.execute(
                "SELECT COUNT(*) - COALESCE(SUM(deleted), 0), COALESCE(SUM(deleted), 0) FROM items"
            ).fetchone()
        return int(live), int(deleted)

    def deleted_rows(self) -> np.ndarray:
        """Rows of deleted items, sorted (int64)."""
        rows = self.conn.execute("SELECT row FROM items WHERE deleted = 1 ORDER BY row").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def match(self, flt: Filter) -> np.ndarray:
        """Rows of the live items the filter selects, sorted (int64)."""
        check(flt, self.all_types())
        sql, params = to_sql(flt, self.column)
        with self._errors("filtering"):
            rows = self.conn.execute(f"SELECT row FROM items WHERE deleted = 0 AND {sql} ORDER BY row", params)
            return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def all_types(self) -> dict[str, str]:
        """Fields a filter may name, with their types (builtins included; once per generation)."""
        key = (self.generation(), self.identity())
        if self._all is None or self._all[0] != key:
            out = {"id": "str", "path": "str", "added": "str", **self.types()}
            if self.conn.execute("SELECT 1 FROM items WHERE caption IS NOT NULL LIMIT 1").fetchone():
                out["caption"] = "str"
            self._all = (key, out)
        return dict(self._all[1])

    def rows_of(self, ids: Sequence[str]) -> dict[str, int]:
        """``{id: row}`` of the live items among ``ids`` (unknown ids are absent)."""
        out: dict[str, int] = {}
        for i in range(0, len(ids), _CHUNK):
            part = list(ids[i : i + _CHUNK])
            q = f"SELECT id, row FROM items WHERE deleted = 0 AND id IN ({', '.join('?' * len(part))})"
            out.update(self.conn.execute(q, part).fetchall())
        return out

    def records(self, rows: Sequence[int] | None, fields: Sequence[str] | None = None) -> dict[int, Record]:
        """``{row: Record}`` of stored rows (deleted ones included; ``None``: every live row, in
        one pass), with the metadata ``fields`` (default: all)."""
        cols = self._columns()
        names = list(cols) if fields is None else [n for n in cols if n in fields]
        select = ", ".join(["row", "id", "path", "added", "caption", *(cols[n][1] for n in names)])
        convert = [(n, _FROM_SQL.get(cols[n][0])) for n in names]
        out: dict[int, Record] = {}
        if rows is None:
            parts: list[tuple[str, Sequence[int]]] = [(f"SELECT {select} FROM items WHERE deleted = 0", ())]
        else:
            unique = sorted({int(r) for r in rows})
            parts = [
                (f"SELECT {select} FROM items WHERE row IN ({', '.join('?' * len(part))})", part)
                for part in (unique[i : i + _CHUNK] for i in range(0, len(unique), _CHUNK))
            ]
        for q, args in parts:
            for rec in self.conn.execute(q, args):
                meta = {n: v if f is None else f(v) for (n, f), v in zip(convert, rec[5:]) if v is not None}
                out[rec[0]] = Record(rec[0], rec[1], rec[2], rec[3], rec[4], meta)
        return out

    def live_ids(self) -> list[str]:
        """Ids of the live items in row order."""
        return [r[0] for r in self.conn.execute("SELECT id FROM items WHERE deleted = 0 ORDER BY row")]

    def column_values(self, name: str) -> list[str | None]:
        """One column of every stored row, in row order (``id``, ``path``, ``caption``)."""
        return [r[0] for r in self.conn.execute(f"SELECT {self.column(name)} FROM items ORDER BY row")]

    # ------------------------------------------------------------------ changes (inside write())
    def insert(
        self,
        rows: Sequence[int],
        ids: Sequence[str],
        paths: Sequence[str],
        metadata: Sequence[Metadata],
        added: str,
        captions: Sequence[str] | None = None,
    ) -> None:
        cols = self._columns()
        names = list(cols)
        sql_cols = ", ".join(["row", "id", "path", "caption", "added", *(cols[n][1] for n in names)])
        marks = ", ".join("?" * (5 + len(names)))
        data = (
            (
                int(r),
                ids[j],
                paths[j],
                None if captions is None else captions[j],
                added,
                *(_to_sql(metadata[j].get(n)) for n in names),
            )
            for j, r in enumerate(rows)
        )
        try:
            self.conn.executemany(f"INSERT INTO items ({sql_cols}) VALUES ({marks})", data)
        except sqlite3.IntegrityError as exc:
            raise CatalogError(f"{self.path}: an id is stored twice ({exc})") from None

    def mark_deleted(self, rows: Sequence[int]) -> int:
        n = 0
        for i in range(0, len(rows), _CHUNK):
            part = [int(r) for r in rows[i : i + _CHUNK]]
            cur = self.conn.execute(
                f"UPDATE items SET deleted = 1 WHERE deleted = 0 AND row IN ({', '.join('?' * len(part))})", part
            )
            n += cur.rowcount
        return n

    def revive(self, ids: Sequence[str]) -> int:
        """Make the newest deleted row of each id live again (not once compacted, nor while
        another row of that id is live); returns how many."""
        n = 0
        for i in ids:
            n += self.conn.execute(
                "UPDATE items SET deleted = 0 WHERE row = (SELECT MAX(row) FROM items WHERE id = ?1 AND deleted = 1) "
                "AND NOT EXISTS (SELECT 1 FROM items WHERE id = ?1 AND deleted = 0)",
                (i,),
            ).rowcount
        return n

    def update(self, changes: Mapping[int, Metadata]) -> None:
        """Set (or, for ``None``, clear) metadata fields (and ``path``) of rows; new fields must exist."""
        by_fields: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for row, meta in changes.items():
            names = tuple(sorted(meta))
            by_fields.setdefault(names, []).append((*(_to_sql(meta[n]) for n in names), int(row)))
        for names, data in by_fields.items():
            if not names:
                continue
            sets = ", ".join(f"{self.column(n)} = ?" for n in names)
            self.conn.executemany(f"UPDATE items SET {sets} WHERE row = ?", data)

    def renumber(self, keep: np.ndarray) -> None:
        """Compaction: drop deleted rows and give the kept rows ``keep`` (sorted, old numbers)
        the new numbers ``0 .. len(keep) - 1``."""
        conn = self.conn
        conn.execute("DELETE FROM items WHERE deleted = 1")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS renumber (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        conn.execute("DELETE FROM renumber")
        conn.executemany("INSERT INTO renumber VALUES (?, ?)", ((int(o), n) for n, o in enumerate(keep.tolist())))
        conn.execute("UPDATE items SET row = -1 - (SELECT new FROM renumber WHERE old = items.row)")
        conn.execute("UPDATE items SET row = -1 - row")
        conn.execute("DELETE FROM renumber")

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file (after large writes)."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def integrity(self) -> None:
        """SQLite's own integrity check (``index info --verify``)."""
        with self._errors("checking the catalogue"):
            result = self.conn.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise CatalogError(f"{self.path}: damaged ({result})")


def _to_sql(value: Value | None) -> str | int | float | None:
    return int(value) if isinstance(value, bool) else value


_FROM_SQL: dict[str, Callable[[Any], Value]] = {"bool": bool, "float": float}  # str and int come back as they went in
