"""Following libvirt block jobs: BLOCK_JOB_2 events first, a bounded check second.

libvirt delivers BLOCK_JOB_2 events (keyed by domain and target, which, unlike
the older BLOCK_JOB event's path, does not change at a pivot) through
libvirtaio on the loop thread.  Events can be lost (libvirtd restarting, a
connection dropped), so every ``CHECK_INTERVAL`` the follower also asks libvirt
for the job's state; that check also yields progress.  A job that vanished is
never assumed to have succeeded: the caller judges it from the chain.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import Conflict

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0

# libvirt's virConnectDomainEventBlockJobStatus
COMPLETED, FAILED, CANCELED, READY = 0, 1, 2, 3


class PivotNotReady(Conflict):
    """The hypervisor refused a pivot because the job is not ready yet."""

    code = "pivot_not_ready"


class JobEnd(enum.Enum):
    COMPLETED = "completed"  # the event said so
    READY = "ready"  # active commit: event and <mirror ready='yes'> both
    FAILED = "failed"
    CANCELED = "canceled"
    GONE = "gone"  # no event, no job: judge from the chain


@dataclass(frozen=True)
class JobInfo:
    cur: int
    end: int
    kind: str = ""  # pull, commit, active-commit, copy, other

    @property
    def percent(self) -> int:
        return 100 if self.end == 0 else min(100, self.cur * 100 // self.end)


class BlockJobEvents:
    """The last BLOCK_JOB_2 status per (domain, target), and who waits for it."""

    def __init__(self) -> None:
        self._status: dict[tuple[str, str], int] = {}
        self._changed: dict[tuple[str, str], asyncio.Event] = {}

    def on_event(self, domain: str, target: str, status: int) -> None:
        """Called on the loop thread by libvirtaio's dispatch."""
        key = (domain, target)
        log.debug("BLOCK_JOB_2 %s/%s status %d", domain, target, status)
        self._status[key] = status
        self._event(key).set()

    def _event(self, key: tuple[str, str]) -> asyncio.Event:
        return self._changed.setdefault(key, asyncio.Event())

    def forget(self, domain: str, target: str) -> None:
        """Before a new job starts on the disk: old statuses do not count."""
        self._status.pop((domain, target), None)
        self._event((domain, target)).clear()

    def status(self, domain: str, target: str) -> int | None:
        return self._status.get((domain, target))

    async def changed(self, domain: str, target: str, timeout: float) -> None:
        event = self._event((domain, target))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return
        event.clear()


JobCheck = Callable[[], Awaitable[JobInfo | None]]
ReadyCheck = Callable[[], Awaitable[bool]]
Progress = Callable[[JobInfo], Awaitable[None]]


async def follow(
    events: BlockJobEvents, domain: str, target: str, *, check: JobCheck,
    mirror_ready: ReadyCheck, progress: Progress, want_ready: bool,
    check_interval: float = CHECK_INTERVAL,
) -> JobEnd:
    """Until the job on DOMAIN/TARGET ends (or, WANT_READY, is ready to pivot)."""
    while True:
        status = events.status(domain, target)
        if status == COMPLETED:
            return JobEnd.COMPLETED
        if status in (FAILED, CANCELED):
            return JobEnd.FAILED if status == FAILED else JobEnd.CANCELED
        info = await check()
        if info is None:
            status = events.status(domain, target)  # an event may have come meanwhile
            if status == COMPLETED:
                return JobEnd.COMPLETED
            return JobEnd.GONE
        # libvirt has reported READY without the XML saying so, and the
        # reverse: both must hold before a pivot (VDSM's lesson).  With no
        # event at all (this process started after it came) the XML's word,
        # which libvirt set from QEMU's event, is enough: a mirror kept busy
        # by the guest seldom shows cur == end.  Asked before the progress,
        # whose convergence check must never give up on a ready job.
        if (want_ready and (status in (READY, None) or info.cur == info.end)
                and await mirror_ready()):
            return JobEnd.READY
        await progress(info)
        await events.changed(domain, target, check_interval)
