"""PostgreSQL backend: one store shared by every host and service replica.

One connection per process, used by one worker thread at a time; it is
reopened after a failure, so a database restart costs the calls made while it
was down (answered 503, nothing changed) and nothing after.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from .backend import Row, StoreUnavailable

T = TypeVar("T")
CONNECT_TIMEOUT = 5


def _sql(sql: str) -> str:
    # Our statements never hold a literal '?' or '%'.
    return sql.replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(_sql(sql), args).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(_sql(sql), args).fetchall()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(_sql(sql), args).rowcount


class PostgresBackend:
    dialect = "postgresql"
    lock_rows = " FOR UPDATE"
    insertion_order = "seq"

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Row] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Row]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, row_factory=dict_row,
                                         connect_timeout=CONNECT_TIMEOUT)
        return self._conn

    def _locked(self, fn: Callable[[_PgTx], T]) -> T:
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    return fn(_PgTx(conn))
            except psycopg.OperationalError as err:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                # The message can hold the host but never the password.
                raise StoreUnavailable(f"PostgreSQL: {str(err).strip()}") from err

    async def run(self, fn: Callable[[_PgTx], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
