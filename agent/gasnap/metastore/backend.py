"""What the store needs from a database: run a function in one transaction.

SQL is written once, with ``?`` placeholders; each backend adapts it.  Calls
run in a worker thread so the event loop never waits on the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from ..metadata import MetadataUnavailable

T = TypeVar("T")
Row = dict[str, Any]


class StoreUnavailable(MetadataUnavailable):
    """The database behind the store cannot be reached."""


class Tx(Protocol):
    """One open transaction."""

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run SQL; the number of rows it changed."""


class Backend(Protocol):
    dialect: str  # "sqlite" or "postgresql": picks the migration's DDL
    # Appended to a SELECT that precedes an UPDATE of the same row: SQLite
    # locks the whole file for the transaction, PostgreSQL needs the row lock
    # so that replicas sharing the database cannot both pass a status check.
    lock_rows: str
    # A column that grows with every insert: the tie-break of listings.
    insertion_order: str

    async def run(self, fn: Callable[[Tx], T]) -> T: ...

    async def close(self) -> None: ...
