"""Boundary rules that a real service would only show by misbehaving: a
metadata service answering with codes gasnap does not own, a SQLite COMMIT
that fails, PostgreSQL's server-side bounds, a page size in another script."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gasnap import httpkit
from gasnap.errors import BadRequest, Unavailable
from gasnap.metaclient import MetadataRejected, MetadataUnauthorized, RemoteMetadata
from gasnap.metadata import (
    CloneNotFound,
    CloneStatus,
    InvalidLimits,
    MetadataUnavailable,
    SnapshotNotFound,
    VolumeLimits,
    WrongStatus,
)
from gasnap.metastore.postgres import PostgresBackend
from gasnap.sqlitedb import SqliteDB
from gasnap.virt.connection import Connection, VirtError
from pgcluster import Cluster

# --- the metadata client ------------------------------------------------------------

ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "gone": (404, {"error": {"code": "snapshot_not_found", "message": "no such snapshot"}}),
    "bare-404": (404, {"error": {"message": "not here"}}),
    "volume-404": (404, {"error": {"code": "volume_not_found", "message": "no volume"}}),
    "status": (409, {"error": {"code": "wrong_status", "message": "is creating"}}),
    "other-409": (409, {"error": {"message": "taken"}}),
    "token": (401, {"error": {"code": "unauthorized", "message": "wrong token"}}),
    "forbidden": (403, {"error": {"message": "not yours"}}),
    "down": (503, {}),
}


ATTEMPTS: list[float] = []


@pytest.fixture
async def service() -> AsyncIterator[tuple[RemoteMetadata, list[str]]]:
    paths: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        paths.append(request.raw_path)
        ATTEMPTS.append(time.monotonic())
        status, doc = ANSWERS.get(request.match_info["id"], (404, {}))
        return web.json_response(doc, status=status)

    app = web.Application()
    app.router.add_route("*", "/v1/snapshots/{id}", answer)
    app.router.add_route("*", "/v1/snapshots/{id}/action", answer)
    server = TestServer(app)
    await server.start_server()
    client = RemoteMetadata(str(server.make_url("")), deadline=1)
    yield client, paths
    await client.close()
    await server.close()


@pytest.mark.parametrize(("snapshot_id", "error", "code"), [
    ("gone", SnapshotNotFound, "snapshot_not_found"),
    ("bare-404", SnapshotNotFound, "snapshot_not_found"),  # a contract-only service
    ("volume-404", MetadataRejected, "volume_not_found"),  # not "no such snapshot"
    ("status", WrongStatus, "wrong_status"),
    ("other-409", WrongStatus, "wrong_status"),
    ("token", MetadataUnauthorized, "metadata_unauthorized"),
    ("forbidden", MetadataUnauthorized, "metadata_unauthorized"),
])
async def test_answers_mean_what_the_protocol_says(
    service: tuple[RemoteMetadata, list[str]], snapshot_id: str, error: type[Exception],
    code: str,
) -> None:
    client, _ = service
    with pytest.raises(error) as info:
        await client.get_snapshot(snapshot_id)
    assert getattr(info.value, "code", None) == code
    if error is MetadataUnauthorized:
        assert isinstance(info.value, Unavailable)  # 503: the host's config, not the caller


async def test_no_attempt_starts_past_the_deadline(
    service: tuple[RemoteMetadata, list[str]]
) -> None:
    """The deadline bounds when the last try starts, back-off included: a
    service that comes back just after it must not be asked again (the fault
    matrix once saw a create succeed past its metadata deadline)."""
    client, _ = service
    ATTEMPTS.clear()
    start = time.monotonic()
    with pytest.raises(MetadataUnavailable):
        await client.get_snapshot("down")
    assert len(ATTEMPTS) >= 2, ATTEMPTS  # it did retry
    assert max(ATTEMPTS) - start < client.deadline, ATTEMPTS


async def test_snapshot_ids_stay_one_path_segment(
    service: tuple[RemoteMetadata, list[str]]
) -> None:
    client, paths = service
    for hostile in ("../../volumes/x", "a/b", "x?status=available"):
        with pytest.raises((SnapshotNotFound, MetadataUnavailable)):
            await client.get_snapshot(hostile)
    for dots in (".", ".."):  # resolved away by any URL library: never sent
        with pytest.raises(MetadataRejected):
            await client.get_snapshot(dots)
    assert len(paths) == 3
    assert all(p.startswith("/v1/snapshots/") and p.count("/") == 3 and "?" not in p
               for p in paths), paths


async def test_a_service_without_clone_records(
    service: tuple[RemoteMetadata, list[str]]
) -> None:
    """A service that keeps to the snapshot contract alone (no /v1/clones):
    no clone is known there, so snapshot deletes still plan; making one is
    refused with a code that says why."""
    client, _ = service
    assert await client.list_clones(volume_id="v1") == []
    with pytest.raises(CloneNotFound):
        await client.get_clone("c1")
    with pytest.raises(MetadataRejected) as info:
        await client.finalize_clone_metadata("c1", CloneStatus.AVAILABLE)
    assert info.value.code == "clones_unsupported"


async def test_a_service_without_volume_limits(
    service: tuple[RemoteMetadata, list[str]]
) -> None:
    """No limits route: no volume has its own limits there (the agent's
    defaults hold), and setting one is refused with a code that says why."""
    client, _ = service
    assert await client.get_volume_limits("v1") == VolumeLimits()
    with pytest.raises(MetadataRejected) as info:
        await client.update_volume_limits("v1", {"max_snapshots": 3})
    assert info.value.code == "limits_unsupported"
    with pytest.raises(InvalidLimits):  # checked before anything is sent
        await client.update_volume_limits("v1", {"max_snapshots": -3})


# --- SQLite ---------------------------------------------------------------------------


async def test_a_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT: the transaction must not stay
    open, or every later call would fail."""
    db = SqliteDB(tmp_path / "t.db", """
        CREATE TABLE IF NOT EXISTS parent (id TEXT PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS child (
            id TEXT PRIMARY KEY,
            parent TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
    """)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            await db.run(lambda c: c.execute("INSERT INTO child VALUES ('c', 'nobody')"))
        await db.run(lambda c: c.execute("INSERT INTO parent VALUES ('p')"))
        rows = await db.run(lambda c: c.execute("SELECT id FROM parent").fetchall())
        assert [r["id"] for r in rows] == ["p"]
    finally:
        db.close()


# --- PostgreSQL -------------------------------------------------------------------------


async def test_postgres_calls_are_bounded_on_the_server(postgres: Cluster) -> None:
    backend = PostgresBackend(postgres.new_database())
    try:
        settings = await backend.run(lambda tx: [
            tx.one(f"SHOW {name}") for name in
            ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")])
        assert [next(iter(row.values())) for row in settings if row] == ["30s", "10s", "1min"]
    finally:
        await backend.close()


# --- HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["²", "٣", "0", "1001", "-1", "x"])
def test_a_page_size_must_be_ascii_digits_in_range(raw: str) -> None:
    from aiohttp.test_utils import make_mocked_request  # noqa: PLC0415

    with pytest.raises(BadRequest):
        httpkit.page_query(make_mocked_request("GET", f"/v1/snapshots?limit={raw}"))


async def test_changes_to_one_definition_never_interleave() -> None:
    """REVIEW-2 item 15: the offline switch reads, changes and writes the
    persistent XML; a clone's attach or detach in between would be lost.
    Changes of one domain's definition run one at a time."""
    from gasnap.virt import LibvirtHypervisor  # noqa: PLC0415

    hv = LibvirtHypervisor("test:///default")
    log: list[str] = []

    async def call(_run: object, *, what: str, retry: bool = True) -> None:
        log.append(f"start {what}")
        await asyncio.sleep(0.05)
        log.append(f"end {what}")

    hv.connection.call = call  # type: ignore[method-assign, assignment]
    await asyncio.gather(
        hv.define_overlays("d", {"vda": "/v/o"}),
        hv.attach_disk("d", "/v/c", "vdc", "s", readonly=False),
        hv.define_disk_source("d", "vdb", "/v/b", "qcow2"),
        hv.define_overlays("other", {"vda": "/w/o"}))
    mine = [entry for entry in log if "other" not in entry]
    assert all(mine[i].startswith("start") and mine[i + 1].startswith("end")
               for i in range(0, len(mine), 2)), log
    assert log.index("start other: switch overlays") < log.index(mine[-1])  # not serialized


class _AliveConn:
    def isAlive(self) -> bool:
        return True


async def test_a_libvirt_python_system_error_is_a_libvirt_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt-python raises SystemError when a Python callback it ran inside
    a call raised (seen once from ``restoreFlags``): the caller must settle it
    as a libvirt failure; as a bare SystemError it went past the revert's
    undo and left the domain off with its operation claimed."""
    conn = Connection("qemu:///nowhere")

    async def fake() -> Any:
        return _AliveConn()

    monkeypatch.setattr(conn, "_connection", fake)

    def restore(_conn: Any) -> None:
        try:
            raise RuntimeError("a callback failed")
        except RuntimeError as inner:
            raise SystemError("returned a result with an exception set") from inner

    with pytest.raises(VirtError, match=r"libvirt-python failed.*a callback failed"):
        await conn.call(restore, what="d: restore", retry=False)
