"""PostgreSQL backend: one store shared by every host and service replica.

A few connections per process (``POOL_SIZE``), each used by one worker
thread at a time, so one slow call does not queue every other one behind it.
Every statement and every lock wait is bounded on the server
(``statement_timeout``, ``lock_timeout``): a call that hits a bound is
answered 503 with nothing changed, never left hanging.  A connection that
failed is dropped and the next call opens a fresh one, so a database restart
costs the calls made while it was down and nothing after.
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
POOL_SIZE = 4
STATEMENT_TIMEOUT_MS = 30_000
LOCK_TIMEOUT_MS = 10_000
IDLE_IN_TRANSACTION_MS = 60_000
_OPTIONS = (f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS} "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}")


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
        self._idle: list[psycopg.Connection[Row]] = []
        self._lock = threading.Lock()  # guards _idle
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._closed = False

    def _take(self) -> psycopg.Connection[Row]:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return psycopg.connect(self._url, autocommit=True, row_factory=dict_row,
                               connect_timeout=CONNECT_TIMEOUT, options=_OPTIONS)

    def _give_back(self, conn: psycopg.Connection[Row]) -> None:
        with self._lock:
            if self._closed or conn.closed:
                conn.close()
            else:
                self._idle.append(conn)

    def _run(self, fn: Callable[[_PgTx], T]) -> T:
        with self._slots:
            conn: psycopg.Connection[Row] | None = None
            try:
                conn = self._take()
                with conn.transaction():
                    result = fn(_PgTx(conn))
            except psycopg.OperationalError as err:
                if conn is not None:
                    conn.close()
                # The message can hold the host but never the password.
                raise StoreUnavailable(f"PostgreSQL: {str(err).strip()}") from err
            except BaseException:
                if conn is not None:
                    self._give_back(conn)
                raise
            self._give_back(conn)
            return result

    async def run(self, fn: Callable[[_PgTx], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
