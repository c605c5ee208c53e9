"""Creating snapshots: freeze, switch to pre-created overlays, thaw, record.

``execute`` runs a plan (``createplan``), writing each step to the journal
before taking it:

  planned → recording (create-snapshot-metadata, status creating)
          → overlays (qemu-img create, relative backing)
          → freezing (guard armed, fsfreeze, snapshotCreateXML)
          → thawed (always) → offline (stopped domains' persistent XML)
          → finalizing (``settle``: the live chain decides available | error)

Only the switch happens inside the freeze window: the overlays exist before
the first guest is frozen, the backend has staged them (``Hypervisor.staging``:
on bare QEMU, each overlay's block node is added before the freeze), the
domains are held by the UUIDs planned (no name lookups in the window), and
no journal write comes between freeze and switch
(recovery judges a switch from the live chain either way, and proves
consistency only from "thawed").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .. import faults, images, metrics, qemuimg
from ..errors import Conflict, GasnapError, Unavailable, from_os_error
from ..freezeguard import FreezeGuardError
from ..guestagent import (
    THAW_TIMEOUT,
    AgentCommandFailed,
    GuestAgentError,
)
from ..journal import Operation
from ..metadata import (
    Consistency,
    NewSnapshot,
    SnapshotMeta,
    Status,
)
from ..quiesce import Quiesce
from . import Context, limits, outage, space, tree
from .createplan import CreatePlan, VolumePlan
from .settle import settle
from .steps import CreateStep, Kind
from .windowtimes import WindowTimes

log = logging.getLogger(__name__)


class QuiesceFailed(GasnapError):
    code = "quiesce_failed"


# --- execute -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    snapshots: list[SnapshotMeta]
    failure: GasnapError | None  # why the create as a whole failed, if it did
    pauses: dict[str, float] = field(default_factory=dict)  # memory: seconds each stood still
    warnings: list[str] = field(default_factory=list)  # soft limits passed
    window: dict[str, Any] = field(default_factory=dict)  # WindowTimes.to_result, if one ran


async def execute(ctx: Context, planned: CreatePlan) -> Outcome:
    op = await ctx.journal.begin(Kind.CREATE, CreateStep.PLANNED, planned.to_dict(),
                                 volumes=[v.volume_id for v in planned.volumes])
    faults.hit("create:planned")
    consistency: dict[str, str] = {}
    pauses: dict[str, float] = {}
    times = WindowTimes()
    failure: GasnapError | None = None
    warnings: list[str] = []
    recorded = False
    try:
        op, warnings = await _record(ctx, op, planned)
        recorded = True
        op = await _make_overlays(ctx, op, planned)
        # Every planned domain, stopped ones too: a name that changed hands
        # since the plan is refused here, never switched.
        async with ctx.hv.hold(planned.uuids):
            async with _staged(ctx, planned):
                op, consistency = await _freeze_window(ctx, op, planned, pauses, times)
            op = await _switch_offline(ctx, op, planned)
    except GasnapError as err:
        failure = await space.explain_any(err, planned.directories(), ctx.min_free)
    except OSError as err:  # chown, chmod, link: the host refused
        failure = from_os_error(err)
    reason = failure.message if failure else "the overlay did not become active"
    op = await ctx.journal.step(op, CreateStep.FINALIZING, consistency=consistency)
    faults.hit("create:finalizing")
    try:
        # Once every record exists, disks may change: from then on the
        # records must be finalized, however long the service is away.
        metas = await _settle(ctx, planned, consistency, reason, persist=recorded)
    except Unavailable as err:
        # libvirt past its outage bound, or (before any record existed) the
        # metadata service, is away: the journal keeps the operation and its
        # volumes, and the agent's sweep settles it once both answer.
        log.error("create: cannot finalize now (%s); the sweep will", err.message)
        ctx.journal.release(op)
        return Outcome([], failure or err)
    await settle_memory(planned, metas)
    await ctx.journal.finish(op)
    _prepare_spares(ctx, planned, metas)
    return Outcome(metas, failure, pauses, warnings,
                   times.to_result() if times.phases else {})


async def _settle(ctx: Context, planned: CreatePlan, consistency: dict[str, str],
                  reason: str, *, persist: bool) -> list[SnapshotMeta]:
    """``settle``, a libvirtd restart waited out, so that the task tells what
    became of its snapshots rather than leave it to the sweep."""
    return await outage.ride_out(ctx, "create: finalize", lambda: settle(
        ctx, planned, consistency, reason, persist=persist))


async def settle_memory(planned: CreatePlan, metas: list[SnapshotMeta]) -> None:
    """The memory file of a domain with an available snapshot is sealed (its
    size written next to it: a file cut short is known before a restore);
    one whose domain has none goes."""
    kept = {m.domain for m in metas if m.status is Status.AVAILABLE}
    for name, path in planned.memory.items():
        if name in kept:
            await asyncio.to_thread(images.seal_memory, path)
        else:
            await asyncio.to_thread(images.drop_memory, path)


async def _record(ctx: Context, op: Operation, planned: CreatePlan
                  ) -> tuple[Operation, list[str]]:
    """Every volume's record, status creating; the limits are checked first,
    while no record exists (the plan may not have read them: an outage).
    Returns the soft limits' warnings."""
    op = await ctx.journal.step(op, CreateStep.RECORDING)
    warnings = await limits.check(ctx, planned.volumes, cinder_ok=planned.cinder_ok)
    for v in planned.volumes:
        # Read now, not at plan time: a metadata outage delays the create
        # (this step waits it out), it does not refuse the request.
        parent = tree.nearest(v.below, await ctx.metadata.list_snapshots(
            volume_id=v.volume_id))
        made = await ctx.metadata.create_snapshot_metadata(NewSnapshot(
            snapshot_id=v.snapshot_id, volume_id=v.volume_id, name=planned.name,
            description=planned.description, size=v.size, created_at=planned.created_at,
            domain=v.domain, group_id=planned.group_id, target=v.target,
            schedule=planned.schedule, parent=parent.id if parent else None,
            origin=planned.origin, memory_file=planned.memory.get(v.domain),
            domain_state=v.domain_state,
        ))
        if made.status is not Status.CREATING:
            # The store answers a retried write with the record it made; a
            # record of this id already settled was made by another call
            # (while one is creating, its volume is held: no other gets here).
            raise Conflict(f"snapshot {v.snapshot_id} already exists ({made.status.value})",
                           code="snapshot_exists")
    faults.hit("create:recording")
    return op, warnings


async def _make_overlays(ctx: Context, op: Operation, planned: CreatePlan) -> Operation:
    op = await ctx.journal.step(op, CreateStep.OVERLAYS)
    # All at once, and every one finished before an error is raised: settle
    # must not remove an overlay that is still being written.
    results = await asyncio.gather(*(_make_overlay(ctx, v) for v in planned.volumes
                                     if not v.reuse), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    faults.hit("create:overlays")
    return op


async def _make_overlay(ctx: Context, v: VolumePlan) -> None:
    if await ctx.spares.take(images.spare_path(v.image), v.image, v.format, v.size, v.overlay):
        return
    await qemuimg.create_overlay(v.overlay, images.relative_pointer(v.overlay, v.image),
                                 v.format, v.size)
    await images.adopt_owner(v.overlay, v.image)


def _prepare_spares(ctx: Context, planned: CreatePlan, metas: list[SnapshotMeta]) -> None:
    """Spares for the next snapshot of the live volumes whose overlay, made
    and named by gasnap, just became active (an overlay the caller made, as
    Cinder makes Nova's ``new_file``, is in a directory gasnap does not
    manage)."""
    available = {m.id for m in metas if m.status is Status.AVAILABLE}
    for v in planned.volumes:
        if (v.domain in planned.live and v.snapshot_id in available and not v.reuse
                and v.overlay == images.overlay_path(v.image, v.volume_id, v.snapshot_id)):
            ctx.spares.prepare(images.spare_path(v.overlay), v.overlay, "qcow2", v.size)


@contextlib.asynccontextmanager
async def _staged(ctx: Context, planned: CreatePlan) -> AsyncIterator[None]:
    """Every live domain's overlays staged by the backend before the first
    freeze, and what did not become active undone after the last thaw."""
    async with contextlib.AsyncExitStack() as stack:
        for name in planned.live:
            await stack.enter_async_context(ctx.hv.staging(
                name, {v.target: v.overlay for v in planned.of(name)}))
        yield


async def _freeze_window(
    ctx: Context, op: Operation, planned: CreatePlan, pauses: dict[str, float],
    times: WindowTimes,
) -> tuple[Operation, dict[str, str]]:
    """Freeze, switch every live domain, thaw.  Returns the consistency per
    domain.  The window owns its domains' freezes (``windows``): another
    window on one of them waits until this one has thawed."""
    async with ctx.windows.owning(planned.uuids.get(d, d) for d in planned.live):
        await _disks_as_planned(ctx, planned)
        return await _owned_window(ctx, op, planned, pauses, times)


class DisksChanged(Conflict):
    """A domain's disks are not those planned: a disk was attached or
    detached (a clone) or a chain moved between the plan and the window."""

    code = "disks_changed"


async def _disks_as_planned(ctx: Context, planned: CreatePlan) -> None:
    """Each live domain has the disks planned, on the files planned.  Read
    with the window owned (hot-plugs take it too), before any freeze: a plan
    that went stale while it queued fails here, nothing switched."""
    for name in planned.live:
        dom = await ctx.hv.get_domain(name, uuid=planned.uuids.get(name))
        now = {v.target: v.active_file for v in dom.volumes}
        wanted = {v.target: v.image for v in planned.of(name)}
        alone = set(planned.left_alone.get(name, []))
        moved = [t for t, image in wanted.items() if now.get(t) != image]
        if set(now) != set(wanted) | alone or moved:
            raise DisksChanged(
                f"{name}: its disks changed since the snapshot was planned (now "
                f"{', '.join(sorted(now)) or 'none'}; planned {', '.join(sorted(wanted))}, "
                f"besides {', '.join(sorted(alone)) or 'none'}"
                f"{'; moved: ' + ', '.join(moved) if moved else ''}); nothing was switched")


async def _owned_window(
    ctx: Context, op: Operation, planned: CreatePlan, pauses: dict[str, float],
    times: WindowTimes,
) -> tuple[Operation, dict[str, str]]:
    consistency = {d: Consistency.CRASH.value for d in [*planned.live, *planned.stopped]}
    to_freeze = [] if planned.quiesce is Quiesce.OFF else list(planned.running)
    # The guard's deadline runs from when it takes the arm, which is after
    # this instant: a switch done before armed + freeze_timeout was done
    # before any thaw of the guard's.  (Measured from after the arm, a slow
    # ack or journal write let a switch after the guard's thaw pass as frozen.)
    armed = time.monotonic()
    if to_freeze:
        try:
            await ctx.guard.arm(to_freeze, ctx.freeze_timeout, owner=op.id)
        except FreezeGuardError as err:
            if planned.quiesce is Quiesce.REQUIRED:
                raise QuiesceFailed(f"cannot freeze safely: {err.message}") from err
            log.warning("no freeze guard (%s): taking crash-consistent snapshots", err)
            to_freeze = []
    op = await ctx.journal.step(op, CreateStep.FREEZING, frozen=to_freeze)
    started = time.monotonic()
    times.phases["arm"] = started - armed
    owned = to_freeze
    switch_errors: dict[str, str] = {}
    switched = armed
    try:
        frozen, owned, stop = await _freeze(ctx, to_freeze, planned.quiesce, times)
        times.phases["freeze"] = time.monotonic() - started
        if stop is not None:
            raise stop
        for name in frozen:
            consistency[name] = Consistency.FILESYSTEM.value
        faults.hit("create:switching")
        before_switch = time.monotonic()
        switch_errors = await _switch_live(ctx, planned, pauses, times)
        switched = time.monotonic()
        times.phases["switch"] = switched - before_switch
        faults.hit("create:switched")
    finally:
        before_thaw = time.monotonic()
        await _thaw(ctx, owned, op.id, times)
        times.phases["thaw"] = time.monotonic() - before_thaw
        # A freeze that failed outright was never ours: only its guard goes.
        await _disarm(ctx, [d for d in to_freeze if d not in owned], op.id)
    log.debug("window of %s: %s", ",".join(planned.live), times.to_result())
    if switched - armed >= ctx.freeze_timeout:
        # The guard may have thawed before the switch: no longer a frozen image.
        log.warning("freeze window exceeded %.1fs; recording crash consistency",
                    ctx.freeze_timeout)
        consistency = {d: Consistency.CRASH.value for d in consistency}
    if to_freeze:
        metrics.FREEZE_SECONDS.observe(time.monotonic() - started)
    for name in pauses:  # the disks are the RAM's, whatever the freeze did
        consistency[name] = Consistency.MEMORY.value
    op = await ctx.journal.step(op, CreateStep.THAWED, consistency=consistency)
    if switch_errors:
        raise SwitchFailed("; ".join(f"{d}: {m}" for d, m in switch_errors.items()))
    return op, consistency


class SwitchFailed(GasnapError):
    code = "snapshot_switch_failed"


async def _freeze(ctx: Context, domains: list[str], quiesce: Quiesce, times: WindowTimes
                  ) -> tuple[list[str], list[str], BaseException | None]:
    """Freeze DOMAINS.  Returns those frozen; those whose freeze is ours to
    thaw: every one but those whose agent answered the freeze with an error
    (qemu-ga then froze nothing, or the guest was already frozen by someone
    else, whose freeze is not ours to end), while a timeout is ours (the
    guest may have frozen and answered late); and what must stop the create."""
    results = await asyncio.gather(
        *(times.call("freeze", d, ctx.agent.fsfreeze(d, ctx.freeze_timeout)) for d in domains),
        return_exceptions=True,
    )
    frozen, owned = [], []
    stop: BaseException | None = None
    for name, result in zip(domains, results, strict=True):
        if not isinstance(result, AgentCommandFailed):
            owned.append(name)
        if not isinstance(result, BaseException):
            frozen.append(name)
        elif not isinstance(result, GuestAgentError):
            stop = stop or result
        elif quiesce is Quiesce.REQUIRED:
            stop = stop or QuiesceFailed(f"{name}: freeze failed: {result.message}")
        else:
            log.warning("%s: freeze failed (%s); its snapshot is crash-consistent",
                        name, result.message)
    return frozen, owned, stop


async def _switch_live(ctx: Context, planned: CreatePlan, pauses: dict[str, float],
                       times: WindowTimes) -> dict[str, str]:
    """Switch every live domain (saving the RAM of those in ``memory``, whose
    pause goes to PAUSES); returns libvirt's error per domain that failed
    (what happened to its disks is judged later, from the live XML)."""
    results = await asyncio.gather(
        *(times.call("switch", d, ctx.hv.switch_overlays(
            d, {v.target: v.overlay for v in planned.of(d)}, planned.left_alone.get(d, []),
            planned.memory.get(d))) for d in planned.live),
        return_exceptions=True,
    )
    errors = {}
    for name, result in zip(planned.live, results, strict=True):
        if isinstance(result, GasnapError):
            log.error("%s: snapshot failed: %s", name, result.message)
            errors[name] = result.message
        elif isinstance(result, BaseException):
            raise result
        elif result is not None:
            pauses[name] = result
    return errors


async def _thaw(ctx: Context, domains: list[str], owner: str, times: WindowTimes) -> None:
    """Thaw the domains whose freeze is ours.  The guard stays armed for any
    that cannot be thawed now, and thaws them at its deadline."""
    if not domains:
        return
    results = await asyncio.gather(
        *(times.call("thaw", d, ctx.agent.fsthaw(d, THAW_TIMEOUT)) for d in domains),
        return_exceptions=True,
    )
    thawed = []
    for name, result in zip(domains, results, strict=True):
        if isinstance(result, BaseException):
            log.error("%s: thaw failed (%s); the freeze guard will retry", name, result)
        else:
            thawed.append(name)
    await _disarm(ctx, thawed, owner, thawed=True)


async def _disarm(ctx: Context, domains: list[str], owner: str, *, thawed: bool = False
                  ) -> None:
    if not domains:
        return
    try:
        await ctx.guard.disarm(domains, owner=owner, thawed=thawed)
    except FreezeGuardError as err:
        log.warning("freeze guard: %s", err.message)


async def _switch_offline(ctx: Context, op: Operation, planned: CreatePlan) -> Operation:
    if not planned.stopped:
        return op
    op = await ctx.journal.step(op, CreateStep.OFFLINE)
    for name in planned.stopped:
        try:
            await ctx.hv.define_overlays(name, {v.target: v.overlay for v in planned.of(name)})
        except GasnapError as err:
            log.error("%s: offline switch failed: %s", name, err.message)
    faults.hit("create:offline")
    return op
