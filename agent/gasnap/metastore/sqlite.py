"""SQLite backend: the embedded store's file, or ``sqlite:///PATH``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..sqlitedb import SqliteDB
from .backend import Row, StoreUnavailable

T = TypeVar("T")


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row = self._conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return [dict(row) for row in self._conn.execute(sql, args)]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, args).rowcount


class SqliteBackend:
    dialect = "sqlite"
    lock_rows = ""  # BEGIN IMMEDIATE already holds the file's write lock
    insertion_order = "rowid"

    def __init__(self, path: Path) -> None:
        try:
            self._db = SqliteDB(path, "")
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailable(f"cannot open {path}: {err}") from err

    async def run(self, fn: Callable[[_SqliteTx], T]) -> T:
        try:
            return await self._db.run(lambda conn: fn(_SqliteTx(conn)))
        except sqlite3.OperationalError as err:
            raise StoreUnavailable(f"metadata database: {err}") from err

    async def close(self) -> None:
        self._db.close()
