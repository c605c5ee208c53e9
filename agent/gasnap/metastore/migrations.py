"""Versioned schema: each step runs once, in order, inside one transaction.

A new release appends a step; nothing here is ever edited once released.
Replicas starting together on one PostgreSQL serialise on an advisory lock,
so each step still runs exactly once.
"""

from __future__ import annotations

import logging

from ..metadata import MetadataError
from .backend import Backend, Tx

log = logging.getLogger(__name__)

# Any fixed 64-bit number: the key of PostgreSQL's advisory lock for migrations.
_PG_LOCK = 0x6761736E6170

# (version, {dialect: statements}).  Version 1 uses IF NOT EXISTS so that the
# embedded stores created before migrations existed are adopted as they are.
STEPS: list[tuple[int, dict[str, list[str]]]] = [
    (1, {
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS snapshots (
                id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, name TEXT NOT NULL,
                description TEXT NOT NULL, size INTEGER NOT NULL, created_at TEXT NOT NULL,
                domain TEXT NOT NULL, group_id TEXT, target TEXT, status TEXT NOT NULL,
                file TEXT, backing_file TEXT, consistency TEXT, error TEXT, progress TEXT)""",
            "CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots (volume_id, created_at)",
        ],
        "postgresql": [
            """CREATE TABLE IF NOT EXISTS snapshots (
                id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, name TEXT NOT NULL,
                description TEXT NOT NULL, size BIGINT NOT NULL, created_at TEXT NOT NULL,
                domain TEXT NOT NULL, group_id TEXT, target TEXT, status TEXT NOT NULL,
                file TEXT, backing_file TEXT, consistency TEXT, error TEXT, progress TEXT)""",
            "CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots (volume_id, created_at)",
        ],
    }),
    (2, {
        # Listing by status (recovery, retention) without a full scan.
        "sqlite": ["CREATE INDEX snapshots_status ON snapshots (status)"],
        "postgresql": ["CREATE INDEX snapshots_status ON snapshots (status)"],
    }),
    (3, {
        # Snapshots taken by a schedule carry its name, for retention.
        "sqlite": ["ALTER TABLE snapshots ADD COLUMN schedule TEXT"],
        "postgresql": ["ALTER TABLE snapshots ADD COLUMN schedule TEXT"],
    }),
    (4, {
        # Insertion order, to list a group's records in the order they were
        # made (they share created_at).  SQLite's rowid already is one.
        "sqlite": [],
        "postgresql": ["ALTER TABLE snapshots ADD COLUMN seq BIGSERIAL"],
    }),
    (5, {
        # Pages of a listing (limit/marker) walk this order, and each
        # record's parent is found by the volume's: index lookups, not sorts
        # of the whole table per page.
        "sqlite": ["CREATE INDEX snapshots_order ON snapshots (created_at)",
                   "CREATE INDEX snapshots_lineage ON snapshots (volume_id, created_at, status)"],
        "postgresql": [
            "CREATE INDEX snapshots_order ON snapshots (created_at, seq)",
            "CREATE INDEX snapshots_lineage ON snapshots (volume_id, created_at, seq)"],
    }),
    (6, {
        # Trees (revert): the parent is stored, set by the agent from the
        # chain, instead of derived as the volume's previous snapshot; the
        # records made before keep that derivation, which was right for
        # them (no branch existed).  Origin, state when taken, memory file.
        "sqlite": [
            "ALTER TABLE snapshots ADD COLUMN parent TEXT",
            "ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT 'created'",
            "ALTER TABLE snapshots ADD COLUMN domain_state TEXT",
            "ALTER TABLE snapshots ADD COLUMN memory_file TEXT",
            """UPDATE snapshots SET parent = (SELECT p.id FROM snapshots p
                WHERE p.volume_id = snapshots.volume_id AND p.status <> 'error'
                AND (p.created_at, p.rowid) < (snapshots.created_at, snapshots.rowid)
                ORDER BY p.created_at DESC, p.rowid DESC LIMIT 1)""",
            "CREATE INDEX snapshots_parent ON snapshots (parent)",
        ],
        "postgresql": [
            "ALTER TABLE snapshots ADD COLUMN parent TEXT",
            "ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT 'created'",
            "ALTER TABLE snapshots ADD COLUMN domain_state TEXT",
            "ALTER TABLE snapshots ADD COLUMN memory_file TEXT",
            """UPDATE snapshots s SET parent = (SELECT p.id FROM snapshots p
                WHERE p.volume_id = s.volume_id AND p.status <> 'error'
                AND (p.created_at, p.seq) < (s.created_at, s.seq)
                ORDER BY p.created_at DESC, p.seq DESC LIMIT 1)""",
            "CREATE INDEX snapshots_parent ON snapshots (parent)",
        ],
    }),
    (7, {
        # Clones: volumes made from snapshots.  attached_to is JSON.
        "sqlite": [
            """CREATE TABLE clones (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, source_snapshot TEXT NOT NULL,
                source_volume_id TEXT NOT NULL, mode TEXT NOT NULL, file TEXT NOT NULL,
                image TEXT, size INTEGER NOT NULL, status TEXT NOT NULL,
                created_at TEXT NOT NULL, attached_to TEXT, error TEXT)""",
            "CREATE INDEX clones_source ON clones (source_snapshot)",
            "CREATE INDEX clones_volume ON clones (source_volume_id)",
        ],
        "postgresql": [
            """CREATE TABLE clones (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, source_snapshot TEXT NOT NULL,
                source_volume_id TEXT NOT NULL, mode TEXT NOT NULL, file TEXT NOT NULL,
                image TEXT, size BIGINT NOT NULL, status TEXT NOT NULL,
                created_at TEXT NOT NULL, attached_to TEXT, error TEXT, seq BIGSERIAL)""",
            "CREATE INDEX clones_source ON clones (source_snapshot)",
            "CREATE INDEX clones_volume ON clones (source_volume_id)",
        ],
    }),
    (8, {
        # A volume's own limits (null: the agent's default).
        "sqlite": [
            """CREATE TABLE volume_limits (
                volume_id TEXT PRIMARY KEY, max_snapshots INTEGER,
                soft_limit_percent INTEGER, auto_delete INTEGER, max_chain_depth INTEGER)""",
        ],
        "postgresql": [
            """CREATE TABLE volume_limits (
                volume_id TEXT PRIMARY KEY, max_snapshots INTEGER,
                soft_limit_percent INTEGER, auto_delete BOOLEAN, max_chain_depth INTEGER)""",
        ],
    }),
    (9, {
        # The reference service's stand-in for Cinder's snapshots, so that
        # gasnap's os-update_snapshot_status lands somewhere real in tests
        # and labs (metaserver/cinder.py).
        "sqlite": [
            """CREATE TABLE cinder_snapshots (
                id TEXT PRIMARY KEY, project_id TEXT NOT NULL, volume_id TEXT NOT NULL,
                name TEXT NOT NULL, status TEXT NOT NULL, progress TEXT,
                created_at TEXT NOT NULL)""",
            """CREATE TABLE cinder_updates (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, snapshot_id TEXT NOT NULL,
                status TEXT NOT NULL, progress TEXT)""",
        ],
        "postgresql": [
            """CREATE TABLE cinder_snapshots (
                id TEXT PRIMARY KEY, project_id TEXT NOT NULL, volume_id TEXT NOT NULL,
                name TEXT NOT NULL, status TEXT NOT NULL, progress TEXT,
                created_at TEXT NOT NULL)""",
            """CREATE TABLE cinder_updates (
                seq BIGSERIAL PRIMARY KEY, snapshot_id TEXT NOT NULL,
                status TEXT NOT NULL, progress TEXT)""",
        ],
    }),
]

LATEST = STEPS[-1][0]


def _apply(tx: Tx, dialect: str) -> list[int]:
    if dialect == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK,))
    tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
               "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row["version"] for row in tx.all("SELECT version FROM schema_migrations")}
    if done and max(done) > LATEST:
        raise MetadataError(f"database schema {max(done)} is newer than this gasnap ({LATEST})",
                            code="schema_too_new")
    applied = []
    for version, statements in STEPS:
        if version in done:
            continue
        for statement in statements[dialect]:
            tx.execute(statement)
        tx.execute("INSERT INTO schema_migrations (version, applied_at) "
                   "VALUES (?, CURRENT_TIMESTAMP)", (version,))
        applied.append(version)
    return applied


async def migrate(backend: Backend) -> list[int]:
    """Bring the schema up to date; the versions applied now."""
    applied = await backend.run(lambda tx: _apply(tx, backend.dialect))
    if applied:
        log.info("metadata schema migrated to version %d (applied %s)", LATEST, applied)
    return applied
