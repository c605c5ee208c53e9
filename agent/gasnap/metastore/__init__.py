"""Metadata stores: the contract's records in SQLite or PostgreSQL.

``open_store(url)`` gives a migrated ``SqlMetadata`` for ``sqlite:///PATH`` or
``postgresql://...``; the embedded store of the agent is the SQLite one.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .backend import StoreUnavailable
from .sqlite import SqliteBackend
from .store import SqlMetadata

__all__ = ["SqlMetadata", "StoreUnavailable", "open_sqlite", "open_store"]


async def open_sqlite(path: Path) -> SqlMetadata:
    return await _opened(SqlMetadata(SqliteBackend(path)))


async def _opened(store: SqlMetadata) -> SqlMetadata:
    try:
        return await store.open()
    except BaseException:
        await store.close()
        raise


async def open_store(url: str) -> SqlMetadata:
    if url.startswith("sqlite:///"):
        return await open_sqlite(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        # psycopg is needed only by services that use PostgreSQL.
        from .postgres import PostgresBackend  # noqa: PLC0415

        return await _opened(SqlMetadata(PostgresBackend(url)))
    raise ConfigError("the metadata database must be sqlite:///PATH or postgresql://...")
