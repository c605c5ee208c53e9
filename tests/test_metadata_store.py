"""The embedded metadata store: the contract's transitions and idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gasnap.metadata import (
    Consistency,
    Finalization,
    NewSnapshot,
    SnapshotNotFound,
    Status,
    WrongStatus,
)
from gasnap.metadata_sqlite import SqliteMetadata


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadata]:
    the_store = SqliteMetadata(tmp_path / "meta.db")
    yield the_store
    await the_store.close()


def new(snapshot_id: str = "s1", volume_id: str = "v1", when: str = "2026-01-01T00:00:00Z"
        ) -> NewSnapshot:
    return NewSnapshot(snapshot_id, volume_id, "n", "d", 1024, when, "dom", None, "vda")


AVAILABLE = Finalization(Status.AVAILABLE, "/v/f.s1", "/v/f", Consistency.FILESYSTEM)


async def test_two_phases(store: SqliteMetadata) -> None:
    created = await store.create_snapshot_metadata(new())
    assert created.status is Status.CREATING
    final = await store.finalize_snapshot_metadata("s1", AVAILABLE)
    assert final.status is Status.AVAILABLE
    assert final.backing_file == "/v/f"
    assert final.consistency is Consistency.FILESYSTEM
    assert [m.id for m in await store.list_snapshots(volume_id="v1")] == ["s1"]
    assert await store.list_snapshots(volume_id="v2") == []
    assert [m.id for m in await store.list_snapshots(status=Status.AVAILABLE)] == ["s1"]


async def test_calls_are_idempotent(store: SqliteMetadata) -> None:
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
    store: SqliteMetadata, path: list[Status], status: Status
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


async def test_delete_only_after_deleting(store: SqliteMetadata) -> None:
    await store.create_snapshot_metadata(new())
    await store.finalize_snapshot_metadata("s1", AVAILABLE)
    with pytest.raises(WrongStatus):
        await store.snapshot_delete_metadata("s1")
    await store.update_snapshot_status("s1", Status.DELETING, "90%")
    await store.snapshot_delete_metadata("s1")
    await store.snapshot_delete_metadata("s1")  # idempotent
    with pytest.raises(SnapshotNotFound):
        await store.get_snapshot("s1")


async def test_rename_and_persistence(tmp_path: Path) -> None:
    store = SqliteMetadata(tmp_path / "m.db")
    await store.create_snapshot_metadata(new())
    await store.update_snapshot_metadata("s1", "renamed", None)
    await store.close()
    reopened = SqliteMetadata(tmp_path / "m.db")
    meta = await reopened.get_snapshot("s1")
    assert (meta.name, meta.description) == ("renamed", "d")
    await reopened.close()
