"""Asynchronous tasks: what the API hands back with 202, and the volume locks.

A task holds the volumes it works on from the moment it is accepted until it
ends, so a second request on any of them is refused (409) before anything is
recorded.  Task documents are saved in the journal on every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import Conflict, GasnapError, NotFound
from .journal import Journal

log = logging.getLogger(__name__)


class TaskNotFound(NotFound):
    code = "task_not_found"


class VolumeBusy(Conflict):
    code = "volume_busy"


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class Task:
    id: str
    kind: str
    volumes: frozenset[str]
    state: TaskState = TaskState.QUEUED
    progress: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def to_record(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": self.state.value,
                               "progress": self.progress}
        if self.result is not None:
            doc["result"] = self.result
        if self.error is not None:
            doc["error"] = self.error
        return doc

    @property
    def finished(self) -> bool:
        return self.state in (TaskState.SUCCEEDED, TaskState.FAILED)


@dataclass(frozen=True)
class Done:
    """What a task's work ends with: its result, kept whether it succeeded
    or not (a create that failed still names its records), and the error
    that made it fail, if one did."""

    result: dict[str, Any] | None
    error: GasnapError | None = None


Work = Callable[[Task], Awaitable[Done]]


KEEP_FINISHED = 1000  # finished tasks kept for ``task show``; the oldest go first
RECOVERY_RECHECK = 1.0  # seconds between looks at a volume recovery still holds
PROGRESS_SAVE_INTERVAL = 5.0  # seconds between journal writes of progress alone


class TaskManager:
    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._tasks: dict[str, Task] = {}
        self._busy: dict[str, str] = {}  # volume_id -> task id
        self._running: set[asyncio.Task[None]] = set()
        self._progress_saved: dict[str, float] = {}  # task id -> when (monotonic)

    async def load(self) -> None:
        """Tasks of earlier runs, read-only; one still open then was cut short."""
        for doc in await self._journal.load_tasks(KEEP_FINISHED):
            task = Task(doc["id"], doc["kind"], frozenset(), TaskState(doc["state"]),
                        doc.get("progress", 0), doc.get("result"), doc.get("error"))
            if not task.finished:
                task.state = TaskState.FAILED
                task.error = {"code": "interrupted",
                              "message": "the agent stopped while this task ran; "
                                         "recovery settled its snapshots"}
                await self._journal.save_task(task.to_record())
            task.done.set()
            self._tasks[task.id] = task

    def reserve(self, kind: str, volumes: Iterable[str]) -> Task:
        """A new task holding VOLUMES, or VolumeBusy naming the holder."""
        wanted = frozenset(volumes)
        self._check_free(wanted)
        task = Task(str(uuid.uuid4()), kind, frozenset())
        self._take(task, wanted)
        self._tasks[task.id] = task
        return task

    def queue(self, kind: str) -> Task:
        """A new task that holds nothing yet: its work takes its volumes with
        ``hold`` once they are free (Nova's calls: accepted, then done when
        the instance can)."""
        task = Task(str(uuid.uuid4()), kind, frozenset())
        self._tasks[task.id] = task
        return task

    async def hold(self, task: Task, volumes: Iterable[str], timeout: float) -> None:
        """Give TASK (queued) VOLUMES once no other task and no unsettled
        operation holds any of them: woken by the holder's end, bounded by
        TIMEOUT (VolumeBusy past it)."""
        wanted = frozenset(volumes)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._check_free(wanted)
            except VolumeBusy as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                task.state = TaskState.QUEUED
                holder = self._tasks.get(str(err.details.get("task", "")))
                # An operation recovery has not settled has no task to wait on.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        holder.done.wait() if holder is not None
                        else asyncio.sleep(RECOVERY_RECHECK), min(left, RECOVERY_RECHECK))
                continue
            self._take(task, wanted)
            task.state = TaskState.RUNNING
            return

    def _check_free(self, wanted: frozenset[str]) -> None:
        for volume in sorted(wanted):
            holder = self._busy.get(volume)
            if holder is not None:
                raise VolumeBusy(f"volume {volume} is busy with task {holder}",
                                 task=holder)
            op = self._journal.holder(volume)
            if op is not None:
                raise VolumeBusy(f"volume {volume} has an unfinished operation ({op}) that "
                                 "recovery has not settled yet; see the agent's log",
                                 code="volume_recovering", operation=op)

    def _take(self, task: Task, wanted: frozenset[str]) -> None:
        task.volumes = wanted
        for volume in wanted:
            self._busy[volume] = task.id

    def discard(self, task: Task) -> None:
        """Forget a task that never started (its request was refused)."""
        self._tasks.pop(task.id, None)

    def drop(self, task: Task) -> None:
        """A reserved task that will not run (its request was refused, or its
        work was done before the answer): its volumes are free again."""
        self.release(task)
        self.discard(task)

    def release(self, task: Task) -> None:
        for volume in task.volumes:
            if self._busy.get(volume) == task.id:
                del self._busy[volume]

    async def start(self, task: Task, work: Work) -> None:
        try:
            await self._journal.save_task(task.to_record())
        except BaseException:
            self.release(task)
            self.discard(task)
            raise
        runner = asyncio.get_running_loop().create_task(self._run(task, work))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)

    async def _run(self, task: Task, work: Work) -> None:
        # Not written to the journal: after a restart an unfinished task reads
        # "interrupted" whether it was queued or running, and the write would
        # sit between the request and its first step.
        task.state = TaskState.RUNNING
        try:
            try:
                end = await self._work(task, work)
            finally:
                # Free the volumes before the end is visible: a caller that
                # sees the task finished may ask for the next thing at once.
                self.release(task)
            await self.update(task, **end)
        finally:
            task.done.set()
            self._prune()

    @staticmethod
    async def _work(task: Task, work: Work) -> dict[str, Any]:
        """WORK's end, as the fields ``update`` sets."""
        try:
            done = await work(task)
        except GasnapError as err:
            log.error("task %s (%s) failed: %s", task.id, task.kind, err.message)
            log.debug("traceback", exc_info=True)
            return {"state": TaskState.FAILED, "error": err.to_dict()}
        except Exception as err:
            log.error("task %s (%s) failed: %s", task.id, task.kind, err)
            log.debug("traceback", exc_info=True)
            return {"state": TaskState.FAILED,
                    "error": {"code": "internal", "message": str(err)}}
        if done.error is None:
            return {"state": TaskState.SUCCEEDED, "progress": 100, "result": done.result}
        log.error("task %s (%s) failed: %s", task.id, task.kind, done.error.message)
        return {"state": TaskState.FAILED, "result": done.result,
                "error": done.error.to_dict()}

    def _prune(self) -> None:
        """Forget the oldest finished tasks past KEEP_FINISHED (in memory; the
        journal trims its own copy when it loads them)."""
        finished = [t for t in self._tasks.values() if t.finished]
        for task in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._tasks[task.id]

    async def update(self, task: Task, *, state: TaskState | None = None,
                     progress: int | None = None, result: dict[str, Any] | None = None,
                     error: dict[str, str] | None = None) -> None:
        if state is not None:
            task.state = state
        if progress is not None:
            task.progress = max(0, min(100, progress))
        if result is not None:
            task.result = result
        if error is not None:
            task.error = error
        if (state, result, error) == (None, None, None):
            # Progress alone is for callers watching now (in memory); the
            # journal gets it now and then.  Each save is an fsync, which on
            # ext4 also flushes the copy or merge being reported on.
            now = time.monotonic()
            if now - self._progress_saved.get(task.id, -PROGRESS_SAVE_INTERVAL) < \
                    PROGRESS_SAVE_INTERVAL:
                return
            self._progress_saved[task.id] = now
        else:
            self._progress_saved.pop(task.id, None)
        await self._journal.save_task(task.to_record())

    def get(self, task_id: str) -> Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(f"no task {task_id}") from None

    def list(self) -> list[Task]:
        return list(self._tasks.values())

    async def wait(self, task_id: str, timeout: float) -> Task:
        task = self.get(task_id)
        if not task.finished:
            # On timeout the caller simply sees the task still running.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.done.wait(), timeout)
        return task

    async def close(self) -> None:
        """Cancel running work; its own cleanup (thaw first) runs, and the
        journal lets the next start settle whatever it left."""
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
