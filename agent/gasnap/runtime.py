"""The agent's resources, opened in order and closed in reverse.

Used by the HTTP app (through ``cleanup_ctx``) and by ``gasnap demo``, so both
run the same workflows on the same parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .cinder import CinderReporter
from .cloneservice import CloneService
from .config import Settings
from .errors import Unavailable
from .freezeguard import FreezeGuard
from .hypervisor import Hypervisor
from .journal import Journal
from .metaclient import RemoteMetadata
from .metadata import MetadataService
from .metastore import open_sqlite
from .qmp.backend import QmpHypervisor
from .service import SnapshotService
from .spares import Spares
from .tasks import TaskManager
from .virt import LibvirtHypervisor
from .workflows import Context
from .workflows.recovery import recover

log = logging.getLogger(__name__)

RECOVERY_RETRY = 5.0


@dataclass(frozen=True)
class Runtime:
    hv: Hypervisor
    service: SnapshotService
    clones: CloneService
    cinder: CinderReporter | None  # [cinder]: Nova-style calls reported back


def open_hypervisor(settings: Settings) -> Hypervisor:
    """The backend the settings name; the one place that picks it."""
    if settings.hypervisor == "qmp":
        return QmpHypervisor(settings.qmp_run_dir)
    return LibvirtHypervisor(settings.libvirt_uri, outage_wait=settings.libvirt_outage_wait)


def open_guard(settings: Settings) -> FreezeGuard:
    """The freeze guard, reaching the guests the way the backend does."""
    if settings.hypervisor == "qmp":
        return FreezeGuard(settings.libvirt_uri, qmp_run_dir=settings.qmp_run_dir)
    return FreezeGuard(settings.libvirt_uri)


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    hv = open_hypervisor(settings)
    journal = Journal(settings.state_dir / "journal.db")
    metadata = await _open_metadata(settings)
    guard = open_guard(settings)
    if isinstance(hv, QmpHypervisor):
        hv.guarded_by(guard)
    spares = Spares(enabled=settings.spare_overlays)
    ctx = Context(hv, hv.agent, metadata, journal, guard, settings.freeze_timeout,
                  settings.merge_bandwidth, spares, shutdown_timeout=settings.shutdown_timeout,
                  detach_timeout=settings.detach_timeout,
                  merge_converge_timeout=settings.merge_converge_timeout,
                  min_free=settings.limits_min_free_mib << 20, limits=settings.limits,
                  shared_records=bool(settings.metadata_url))
    tasks = TaskManager(journal)
    await tasks.load()
    service = SnapshotService(ctx, tasks)
    recovery = asyncio.get_running_loop().create_task(
        _recover(ctx, guard, service, settings.sweep_interval))
    cinder = None
    if settings.cinder is not None:
        cinder = CinderReporter(settings.cinder, settings.state_dir / "cinder-outbox.db",
                                metadata)
        cinder.start()
    try:
        yield Runtime(hv, service, CloneService(ctx, tasks, service.ready), cinder)
    finally:
        recovery.cancel()
        await asyncio.gather(recovery, return_exceptions=True)
        if cinder is not None:
            await cinder.close()
        await tasks.close()
        await spares.close()
        await guard.close()
        await hv.close()
        await metadata.close()
        journal.close()


async def _open_metadata(settings: Settings) -> MetadataService:
    if settings.metadata_url:
        log.info("metadata service: %s", settings.metadata_url)
        return RemoteMetadata(settings.metadata_url, settings.metadata_token,
                              settings.metadata_deadline,
                              ca_file=settings.metadata_ca_file or None)
    return await open_sqlite(settings.state_dir / "metadata.db")


async def _recover(ctx: Context, guard: FreezeGuard, service: SnapshotService,
                   sweep_interval: float) -> None:
    """Connect and start the freeze guard (while libvirtd is unreachable, try
    again: the API answers 503 meanwhile), then settle the journal once; the
    agent serves from then on, even if some operation could not be settled
    (its volumes stay busy and the sweep tries it again)."""
    while True:
        try:
            await ctx.hv.list_domains()
            await guard.start()
            break
        except Unavailable as err:
            log.warning("recovery waits for the hypervisor: %s", err.message)
        await asyncio.sleep(RECOVERY_RETRY)
    done = await recover(ctx, first=True)
    if done.settled or done.failed:
        log.warning("recovery settled %d unfinished operation(s); %d left for later",
                    done.settled, done.failed)
    service.ready.set()
    await _sweep(ctx, sweep_interval)


async def _sweep(ctx: Context, interval: float) -> None:
    """Settle, now and then, operations a workflow had to give up (a service
    was away) and those recovery could not settle yet; those still being
    driven are left alone."""
    while True:
        await asyncio.sleep(interval)
        try:
            done = await recover(ctx)
        except Exception as err:  # the journal unreadable: the sweep goes on
            log.error("sweep: %s; trying again later", err, exc_info=True)
            continue
        if done.settled:
            log.warning("sweep settled %d operation(s) given up earlier", done.settled)
