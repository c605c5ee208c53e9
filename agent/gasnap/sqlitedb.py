"""SQLite in WAL mode, one connection per file, every call off the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteDB:
    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by worker threads, serialised by a lock:
        # writes are tiny and the journal's order matters more than throughput.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # a journal must survive power loss
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(schema)

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (busy, I/O error): the transaction
                # is still open then, and the next BEGIN would fail forever.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run FN(conn) in one transaction, in a worker thread."""
        return await asyncio.to_thread(self._locked, fn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
