"""The metadata store on SQLite and on a real PostgreSQL: the contract's
transitions and idempotency, migrations, concurrent replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from gasnap.metaclient import RemoteMetadata
from gasnap.metadata import (
    Attachment,
    CloneChange,
    CloneMode,
    CloneNotFound,
    CloneStatus,
    Consistency,
    Finalization,
    InvalidLimits,
    InvalidMarker,
    MetadataService,
    NewClone,
    NewSnapshot,
    Origin,
    SnapshotNotFound,
    Status,
    VolumeLimits,
    WrongStatus,
)
from gasnap.metastore import StoreUnavailable, migrations, open_store
from gasnap.metastore.migrations import LATEST
from metaservice import TOKEN, MetadataServer
from pgcluster import Cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    cluster: Cluster = request.getfixturevalue("postgres")
    return cluster.new_database()


@pytest.fixture(params=["store", "service"])
async def store(request: pytest.FixtureRequest, db_url: str, tmp_path: Path
                ) -> AsyncIterator[MetadataService]:
    """The store in-process, and the same store behind ``gasnap metadata serve``
    reached by the agent's client: the contract holds through both."""
    if request.param == "store":
        the_store = await open_store(db_url)
        yield the_store
        await the_store.close()
        return
    server = MetadataServer(db_url, tmp_path / "service.log").start()
    client = RemoteMetadata(server.url, TOKEN, deadline=5)
    try:
        yield client
    finally:
        await client.close()
        server.stop()


def new(snapshot_id: str = "s1", volume_id: str = "v1", when: str = "2026-01-01T00:00:00Z"
        ) -> NewSnapshot:
    return NewSnapshot(snapshot_id, volume_id, "n", "d", 1024, when, "dom", None, "vda")


AVAILABLE = Finalization(Status.AVAILABLE, "/v/f.s1", "/v/f", Consistency.FILESYSTEM)


async def test_two_phases(store: MetadataService) -> None:
    created = await store.create_snapshot_metadata(new())
    assert created.status is Status.CREATING
    final = await store.finalize_snapshot_metadata("s1", AVAILABLE)
    assert final.status is Status.AVAILABLE
    assert final.backing_file == "/v/f"
    assert final.consistency is Consistency.FILESYSTEM
    assert [m.id for m in await store.list_snapshots(volume_id="v1")] == ["s1"]
    assert await store.list_snapshots(volume_id="v2") == []
    assert [m.id for m in await store.list_snapshots(status=Status.AVAILABLE)] == ["s1"]


async def test_calls_are_idempotent(store: MetadataService) -> None:
    first = await store.create_snapshot_metadata(new())
    assert await store.create_snapshot_metadata(new()) == first
    with pytest.raises(WrongStatus):
        await store.create_snapshot_metadata(new(volume_id="other"))
    done = await store.finalize_snapshot_metadata("s1", AVAILABLE)
    assert await store.finalize_snapshot_metadata("s1", AVAILABLE) == done


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ([Status.AVAILABLE], Status.CREATING),
        ([Status.ERROR], Status.AVAILABLE),
        ([Status.AVAILABLE, Status.DELETING], Status.AVAILABLE),
    ],
)
async def test_only_contract_transitions(
    store: MetadataService, path: list[Status], status: Status
) -> None:
    await store.create_snapshot_metadata(new())
    for step in path:
        if step in (Status.AVAILABLE, Status.ERROR):
            await store.finalize_snapshot_metadata(
                "s1", Finalization(step, None, None, None, "x" if step is Status.ERROR else None))
        else:
            await store.update_snapshot_status("s1", step, "0%")
    with pytest.raises(WrongStatus):
        if status in (Status.AVAILABLE, Status.ERROR):
            await store.finalize_snapshot_metadata("s1", Finalization(status, None, None, None))
        else:
            await store.update_snapshot_status("s1", status, "0%")


async def test_delete_only_after_deleting(store: MetadataService) -> None:
    await store.create_snapshot_metadata(new())
    await store.finalize_snapshot_metadata("s1", AVAILABLE)
    with pytest.raises(WrongStatus):
        await store.snapshot_delete_metadata("s1")
    await store.update_snapshot_status("s1", Status.DELETING, "90%")
    await store.snapshot_delete_metadata("s1")
    await store.snapshot_delete_metadata("s1")  # idempotent
    with pytest.raises(SnapshotNotFound):
        await store.get_snapshot("s1")


async def test_rename_and_persistence(db_url: str) -> None:
    store = await open_store(db_url)
    await store.create_snapshot_metadata(new())
    await store.update_snapshot_metadata("s1", "renamed", None)
    await store.close()
    reopened = await open_store(db_url)
    meta = await reopened.get_snapshot("s1")
    assert (meta.name, meta.description) == ("renamed", "d")
    await reopened.close()


async def test_migrations_run_once_and_adopt_old_stores(db_url: str, tmp_path: Path) -> None:
    first = await open_store(db_url)
    await first.create_snapshot_metadata(new())
    await first.close()
    again = await open_store(db_url)  # nothing left to apply, data kept
    assert (await again.get_snapshot("s1")).status is Status.CREATING
    await again.close()
    # An embedded store written before migrations existed (its table only).
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE snapshots (id TEXT PRIMARY KEY, volume_id TEXT NOT NULL,"
                 " name TEXT NOT NULL, description TEXT NOT NULL, size INTEGER NOT NULL,"
                 " created_at TEXT NOT NULL, domain TEXT NOT NULL, group_id TEXT, target TEXT,"
                 " status TEXT NOT NULL, file TEXT, backing_file TEXT, consistency TEXT,"
                 " error TEXT, progress TEXT)")
    conn.execute("INSERT INTO snapshots (id, volume_id, name, description, size, created_at,"
                 " domain, status) VALUES ('old', 'v', 'n', '', 1, 't', 'd', 'available')")
    conn.commit()
    conn.close()
    adopted = await open_store(f"sqlite:///{old}")
    assert (await adopted.get_snapshot("old")).status is Status.AVAILABLE
    await adopted.close()
    versions = [r[0] for r in sqlite3.connect(old).execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, LATEST + 1))


async def test_migration_6_keeps_the_parents_of_older_records(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records written before parents were stored get the parent they were
    shown with then: the volume's latest earlier snapshot that did not fail."""
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "STEPS", migrations.STEPS[:5])
        patch.setattr(migrations, "LATEST", 5)
        old = await open_store(db_url)
        rows = [("a", "v1", "available"), ("b", "v2", "available"), ("c", "v1", "error"),
                ("d", "v1", "available")]
        for i, (sid, vol, status) in enumerate(rows):
            await old._db.run(lambda tx, sid=sid, vol=vol, status=status, i=i: tx.execute(
                "INSERT INTO snapshots (id, volume_id, name, description, size, created_at,"
                " domain, status) VALUES (?,?,'n','',1,?,'dom',?)",
                (sid, vol, f"2026-01-01T00:00:0{i}Z", status)))
        await old.close()
    migrated = await open_store(db_url)
    metas = await migrated.list_snapshots()
    assert {m.id: m.parent for m in metas} == {"a": None, "b": None, "c": "a", "d": "a"}
    assert {m.origin for m in metas} == {Origin.CREATED}
    await migrated.close()


async def test_replicas_sharing_postgresql(postgres: Cluster) -> None:
    """Several services on one database: each call's rule holds across them."""
    url = postgres.new_database()
    replicas = await asyncio.gather(*(open_store(url) for _ in range(4)))  # migrate together
    try:
        created = await asyncio.gather(*(r.create_snapshot_metadata(new()) for r in replicas))
        assert {c.id for c in created} == {"s1"}
        assert len(await replicas[0].list_snapshots()) == 1
        await replicas[1].finalize_snapshot_metadata("s1", AVAILABLE)
        # Four replicas race to move it to deleting and then to error_deleting:
        # the row lock makes each transition happen once.
        await asyncio.gather(*(r.update_snapshot_status("s1", Status.DELETING, "0%")
                               for r in replicas))
        outcomes = await asyncio.gather(
            *(r.finalize_snapshot_metadata("s1", Finalization(Status.ERROR, None, None, None))
              for r in replicas), return_exceptions=True)
        assert all(isinstance(o, WrongStatus) for o in outcomes)
    finally:
        for replica in replicas:
            await replica.close()


async def test_unreachable_postgresql_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await open_store("postgresql://gasnap@127.0.0.1:1/none")


async def test_a_group_lists_in_the_order_it_was_made(store: MetadataService) -> None:
    """Records of one group share created_at; listings keep the order they were made in."""
    for sid in ("s9", "s1", "s5"):
        await store.create_snapshot_metadata(new(sid, volume_id=f"v-{sid}"))
    assert [m.id for m in await store.list_snapshots()] == ["s9", "s1", "s5"]


async def test_trees_and_pages(store: MetadataService) -> None:
    """Parents are what the agent recorded (a tree: b and c are both a's
    children); the listing filters by parent and roots; deleting a record
    hands its children to its parent, in one transaction; pages of LIMIT
    after MARKER walk the same order as the full list."""
    plan = [("a", "v1", None, Status.AVAILABLE), ("b", "v1", "a", Status.AVAILABLE),
            ("c", "v1", "a", Status.ERROR), ("d", "v1", "b", Status.AVAILABLE),
            ("e", "v2", None, Status.AVAILABLE)]
    for i, (sid, vol, parent, status) in enumerate(plan):
        await store.create_snapshot_metadata(dataclasses.replace(
            new(sid, vol, f"2026-01-01T00:00:0{i}Z"), parent=parent,
            origin=Origin.BEFORE_REVERT if sid == "d" else Origin.CREATED,
            domain_state="running"))
        await store.finalize_snapshot_metadata(sid, Finalization(
            status, f"/v/f.{sid}" if status is Status.AVAILABLE else None, "/v/f",
            Consistency.FILESYSTEM, error=None if status is Status.AVAILABLE else "failed"))
    everything = await store.list_snapshots()
    assert {m.id: m.parent for m in everything} == {
        "a": None, "b": "a", "c": "a", "d": "b", "e": None}
    d = await store.get_snapshot("d")
    assert (d.parent, d.origin, d.domain_state) == ("b", Origin.BEFORE_REVERT, "running")
    assert [m.id for m in await store.list_snapshots(parent="a")] == ["b", "c"]
    assert [m.id for m in await store.list_snapshots(roots=True)] == ["a", "e"]
    assert [m.id for m in await store.list_snapshots(volume_id="v1", roots=True)] == ["a"]

    await store.update_snapshot_status("b", Status.DELETING, "0%")
    await store.snapshot_delete_metadata("b")
    assert (await store.get_snapshot("d")).parent == "a"  # b's child is a's now
    await store.create_snapshot_metadata(new("b", "v1", "2026-01-01T00:00:01Z"))
    await store.finalize_snapshot_metadata("b", Finalization(
        Status.AVAILABLE, "/v/f.b", "/v/f", Consistency.FILESYSTEM))

    pages, marker = [], None
    while True:
        page = await store.list_snapshots(limit=2, marker=marker)
        pages.append([m.id for m in page])
        if len(page) < 2:
            break
        marker = page[-1].id
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    assert [m.id for m in await store.list_snapshots(volume_id="v1", limit=5, marker="a")] == [
        "b", "c", "d"]
    assert [m.id for m in await store.list_snapshots(domain="dom", status=Status.ERROR)] == [
        "c"]
    assert await store.list_snapshots(domain="elsewhere") == []
    with pytest.raises(InvalidMarker):
        await store.list_snapshots(limit=2, marker="no-such-snapshot")


# --- clones -------------------------------------------------------------------------


def new_clone(clone_id: str = "c1", snapshot_id: str = "s1",
              mode: CloneMode = CloneMode.LINKED) -> NewClone:
    return NewClone(clone_id, snapshot_id, "copy", mode, f"/v/volume-{clone_id}", "/v/f",
                    1024, "2026-01-02T00:00:00Z")


async def test_clone_records_two_phases_and_dependencies(store: MetadataService) -> None:
    """A clone is recorded in two phases from an available snapshot; while a
    linked one (not failed) names the snapshot, the snapshot cannot start
    deleting, on every caller of the store; attach, flatten and delete are
    recorded as the contract's transitions allow."""
    await store.create_snapshot_metadata(new())
    with pytest.raises(WrongStatus):  # still creating
        await store.create_clone_metadata(new_clone())
    with pytest.raises(SnapshotNotFound):
        await store.create_clone_metadata(new_clone(snapshot_id="nope"))
    await store.finalize_snapshot_metadata("s1", AVAILABLE)
    made = await store.create_clone_metadata(new_clone())
    assert (made.status, made.source_volume_id, made.attached_to) == (
        CloneStatus.CREATING, "v1", None)
    assert await store.create_clone_metadata(new_clone()) == made  # idempotent
    await store.create_snapshot_metadata(new("s2", when="2026-01-01T00:00:01Z"))
    await store.finalize_snapshot_metadata("s2", AVAILABLE)
    with pytest.raises(WrongStatus):  # one id, another snapshot
        await store.create_clone_metadata(new_clone(snapshot_id="s2"))
    done = await store.finalize_clone_metadata("c1", CloneStatus.AVAILABLE)
    assert done.status is CloneStatus.AVAILABLE
    assert await store.finalize_clone_metadata("c1", CloneStatus.AVAILABLE) == done

    with pytest.raises(WrongStatus) as refused:
        await store.update_snapshot_status("s1", Status.DELETING, "0%")
    assert refused.value.code == "snapshot_has_clones"
    assert (await store.get_snapshot("s1")).status is Status.AVAILABLE

    where = Attachment("other", "vdb", True)
    attached = await store.update_clone_metadata("c1", CloneChange(attached_to=where))
    assert attached.attached_to == where
    assert (await store.get_clone("c1")).attached_to == where
    assert [c.id for c in await store.list_clones(snapshot_id="s1")] == ["c1"]
    assert [c.id for c in await store.list_clones(volume_id="v1")] == ["c1"]
    assert await store.list_clones(volume_id="v2") == []
    detached = await store.update_clone_metadata("c1", CloneChange(detach=True))
    assert detached.attached_to is None
    full = await store.update_clone_metadata("c1", CloneChange(mode=CloneMode.FULL))
    assert full.mode is CloneMode.FULL
    await store.update_snapshot_status("s1", Status.DELETING, "0%")  # no linked clone now

    with pytest.raises(WrongStatus):  # available cannot be removed directly
        await store.clone_delete_metadata("c1")
    with pytest.raises(WrongStatus):  # available -> creating is no transition
        await store.update_clone_metadata("c1", CloneChange(status=CloneStatus.CREATING))
    await store.update_clone_metadata("c1", CloneChange(status=CloneStatus.DELETING))
    await store.clone_delete_metadata("c1")
    await store.clone_delete_metadata("c1")  # idempotent
    with pytest.raises(CloneNotFound):
        await store.get_clone("c1")


async def test_a_failed_linked_clone_does_not_hold_its_snapshot(store: MetadataService) -> None:
    await store.create_snapshot_metadata(new())
    await store.finalize_snapshot_metadata("s1", AVAILABLE)
    await store.create_clone_metadata(new_clone())
    await store.finalize_clone_metadata("c1", CloneStatus.ERROR, "qemu-img failed")
    assert (await store.get_clone("c1")).error == "qemu-img failed"
    await store.update_snapshot_status("s1", Status.DELETING, "0%")
    await store.clone_delete_metadata("c1")  # error records go at once


async def test_volume_limits_are_kept_and_merged(store: MetadataService) -> None:
    """A volume's own limits: each change sets what it names, null clears
    one, and a volume with none set answers all null (the agent's defaults)."""
    assert await store.get_volume_limits("v1") == VolumeLimits()
    await store.create_snapshot_metadata(new())  # limits live beside records, not in them
    assert await store.update_volume_limits("v1", {"max_snapshots": 10}) == VolumeLimits(10)
    both = await store.update_volume_limits("v1", {"auto_delete": False,
                                                   "soft_limit_percent": 50})
    assert both == VolumeLimits(10, 50, False, None)
    assert await store.get_volume_limits("v1") == both
    assert await store.get_volume_limits("v2") == VolumeLimits()  # per volume
    assert await store.update_volume_limits("v1", {"max_snapshots": None}) == \
        VolumeLimits(None, 50, False, None)
    for bad in ({"max_snapshots": 0}, {"soft_limit_percent": 101}, {"auto_delete": 1},
                {"max_chain_depth": 1}, {"max_snapshots": True}, {"bogus": 3}):
        with pytest.raises(InvalidLimits):
            await store.update_volume_limits("v1", bad)
    assert await store.get_volume_limits("v1") == VolumeLimits(None, 50, False, None)
    cleared = await store.update_volume_limits("v1", {"soft_limit_percent": None,
                                                      "auto_delete": None})
    assert cleared == VolumeLimits() == await store.get_volume_limits("v1")
    assert (await store.get_snapshot("s1")).status is Status.CREATING


async def test_replicas_change_different_limits_at_once(postgres: Cluster) -> None:
    url = postgres.new_database()
    replicas = await asyncio.gather(*(open_store(url) for _ in range(4)))
    try:
        changes = [{"max_snapshots": 7}, {"soft_limit_percent": 60}, {"auto_delete": True},
                   {"max_chain_depth": 9}]
        await asyncio.gather(*(r.update_volume_limits("v", c)
                               for r, c in zip(replicas, changes, strict=True)))
        assert await replicas[0].get_volume_limits("v") == VolumeLimits(7, 60, True, 9)
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_stuck_lock_never_stalls_the_other_calls(
    postgres: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session holds a snapshot's row (a stuck replica, an operator's
    psql): the call that needs it gives up at lock_timeout with nothing
    changed, and calls on other rows go on meanwhile."""
    from gasnap.metastore import postgres as pg  # noqa: PLC0415

    monkeypatch.setattr(pg, "_OPTIONS", "-c statement_timeout=30000 -c lock_timeout=500")
    url = postgres.new_database()
    store = await open_store(url)
    holder = psycopg.connect(url)
    try:
        for sid in ("s1", "s2"):
            await store.create_snapshot_metadata(new(sid))
            await store.finalize_snapshot_metadata(sid, dataclasses.replace(
                AVAILABLE, file=f"/v/f.{sid}"))
        holder.execute("SELECT id FROM snapshots WHERE id = 's1' FOR UPDATE")
        stuck = asyncio.create_task(store.update_snapshot_status("s1", Status.DELETING, "0%"))
        moved = await store.update_snapshot_status("s2", Status.DELETING, "0%")
        assert moved.status is Status.DELETING and not stuck.done()
        with pytest.raises(StoreUnavailable, match="lock"):
            await stuck
    finally:
        holder.rollback()
        holder.close()
    assert (await store.get_snapshot("s1")).status is Status.AVAILABLE
    await store.close()
