"""Tasks and the volumes they hold, on a real journal: a task whose first
journal write fails holds nothing afterwards, and finished tasks do not pile
up for ever (REVIEW item 17)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gasnap import tasks
from gasnap.errors import GasnapError
from gasnap.journal import Journal
from gasnap.tasks import TaskManager, VolumeBusy


async def test_a_task_whose_journal_write_fails_releases_its_volumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "journal.db")
    manager = TaskManager(journal)

    async def broken(_doc: dict[str, Any]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def work(_task: tasks.Task) -> tasks.Done:
        return tasks.Done({})

    task = manager.reserve("snapshot-create", {"v1"})
    with monkeypatch.context() as patch:
        patch.setattr(journal, "save_task", broken)
        with pytest.raises(sqlite3.OperationalError):
            await manager.start(task, work)
    again = manager.reserve("snapshot-create", {"v1"})  # not busy with a task that never ran
    with pytest.raises(VolumeBusy):
        manager.reserve("snapshot-create", {"v1"})
    manager.release(again)
    journal.close()


async def test_finished_tasks_are_pruned(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "KEEP_FINISHED", 3)
    journal = Journal(tmp_path / "journal.db")
    manager = TaskManager(journal)

    async def work(_task: tasks.Task) -> tasks.Done:
        return tasks.Done({})

    made = []
    for i in range(5):
        task = manager.reserve("snapshot-create", {f"v{i}"})
        await manager.start(task, work)
        await task.done.wait()
        made.append(task.id)
    assert [t.id for t in manager.list()] == made[-3:]
    journal.close()
    reopened = TaskManager(Journal(tmp_path / "journal.db"))
    await reopened.load()
    assert [t.id for t in reopened.list()] == made[-3:]


@pytest.mark.parametrize("fails", [False, True])
async def test_a_task_seen_finished_holds_nothing(tmp_path: Path, fails: bool) -> None:
    """The moment a caller can see a task finished, its volumes are free:
    the next request on them (detach after a flatten, found by a CI run)
    is not refused volume_busy by a task that has ended."""
    journal = Journal(tmp_path / "journal.db")
    manager = TaskManager(journal)
    seen: list[bool] = []
    original = manager.update

    async def update(task: tasks.Task, **fields: Any) -> None:
        await original(task, **fields)
        if task.finished:  # what GET /v1/tasks/{id} answers from now on
            nxt = manager.reserve("clone-detach", {"v1"})  # VolumeBusy before the fix
            manager.release(nxt)
            seen.append(True)

    async def work(_task: tasks.Task) -> tasks.Done:
        if fails:
            raise GasnapError("broken")
        return tasks.Done({})

    manager.update = update  # type: ignore[method-assign]
    task = manager.reserve("clone-flatten", {"v1"})
    await manager.start(task, work)
    await task.done.wait()
    assert seen == [True]
    journal.close()


async def test_a_queued_task_waits_for_the_volume_and_no_longer(tmp_path: Path) -> None:
    """Nova's calls on a busy volume (REVIEW-2 R6, issue item 6): accepted,
    queued behind the task that holds the volume, run once it ends; bounded."""
    journal = Journal(tmp_path / "journal.db")
    manager = TaskManager(journal)
    release = asyncio.Event()
    order: list[str] = []

    async def first(_task: tasks.Task) -> tasks.Done:
        await release.wait()
        order.append("first")
        return tasks.Done({})

    async def second(task: tasks.Task) -> tasks.Done:
        await manager.hold(task, {"v1"}, timeout=30)
        order.append("second")
        return tasks.Done({})

    running = manager.reserve("snapshot-create", {"v1"})
    await manager.start(running, first)
    queued = manager.queue("snapshot-delete")
    await manager.start(queued, second)
    await asyncio.sleep(0.1)
    assert queued.state is tasks.TaskState.QUEUED and order == []
    release.set()
    await queued.done.wait()
    assert order == ["first", "second"] and queued.state is tasks.TaskState.SUCCEEDED
    with pytest.raises(VolumeBusy):  # bounded: never waits past its timeout
        blocker = manager.reserve("snapshot-create", {"v2"})
        await manager.hold(manager.queue("snapshot-create"), {"v2"}, timeout=0.2)
    manager.release(blocker)
    journal.close()
