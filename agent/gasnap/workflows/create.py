"""Creating snapshots: freeze, switch to pre-created overlays, thaw, record.

``plan`` validates a request against the live domains and changes nothing;
``execute`` runs the steps, writing each to the journal before taking it:

  planned → recording (create-snapshot-metadata, status creating)
          → overlays (qemu-img create, relative backing)
          → freezing (guard armed, fsfreeze, snapshotCreateXML)
          → thawed (always) → offline (stopped domains' persistent XML)
          → finalizing (``settle``: the live chain decides available | error)

Only the switch happens inside the freeze window: the overlays exist before
the first guest is frozen, the domains are held by the UUIDs planned (no name
lookups in the window), and no journal write comes between freeze and switch
(recovery judges a switch from the live chain either way, and proves
consistency only from "thawed").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import faults, images, metrics, qemuimg
from ..errors import BadRequest, Conflict, GasnapError, NotFound, Unavailable
from ..freezeguard import FreezeGuardError
from ..guestagent import (
    THAW_TIMEOUT,
    AgentAbsent,
    AgentCommandFailed,
    AgentUnresponsive,
    GuestAgentError,
)
from ..hypervisor import AgentState, Domain, DomainState, Volume
from ..journal import Operation
from ..metadata import (
    Consistency,
    NewSnapshot,
    SnapshotMeta,
    Status,
)
from ..quiesce import Quiesce
from . import Context
from .settle import settle
from .steps import CreateStep, Kind

log = logging.getLogger(__name__)

MAX_NAME = 255
MAX_DESCRIPTION = 4096


class VolumeNotFound(NotFound):
    code = "volume_not_found"


class UnsupportedDisk(BadRequest):
    code = "unsupported_disk"


class DomainStateConflict(Conflict):
    code = "domain_state"


class QuiesceFailed(GasnapError):
    code = "quiesce_failed"


@dataclass(frozen=True)
class Preset:
    """A snapshot whose id and overlay the caller chose (Nova's create_info)."""

    snapshot_id: str
    overlay: str  # absolute path, already checked to lie next to the active file
    reuse: bool  # the caller made the overlay (checked: qcow2 on the active file)


@dataclass(frozen=True)
class CreateRequest:
    domains: list[str]
    disks: dict[str, list[str]]  # domain -> targets; a domain not listed: all its disks
    name: str
    description: str
    quiesce: Quiesce
    presets: dict[str, Preset] = field(default_factory=dict)  # by volume_id
    schedule: str | None = None  # the schedule taking it (recorded for retention)


@dataclass(frozen=True)
class VolumePlan:
    snapshot_id: str
    domain: str
    volume_id: str
    target: str
    image: str  # the active file now: the snapshot's point-in-time data
    format: str
    overlay: str  # <image basename>.<snapshot id>, next to the image
    size: int
    reuse: bool = False  # the overlay is the caller's: never created nor removed by us


@dataclass(frozen=True)
class CreatePlan:
    group_id: str | None
    name: str
    description: str
    quiesce: Quiesce
    created_at: str
    volumes: list[VolumePlan]
    live: list[str]  # running or paused: switched by libvirt
    running: list[str]  # the live ones whose guests can be frozen
    stopped: list[str]  # switched offline in the persistent definition
    schedule: str | None = None
    # by domain: the disks not snapshotted, named to libvirt as such (without
    # a read of the definition inside the freeze window)
    left_alone: dict[str, list[str]] = field(default_factory=dict)
    # by domain: its UUID when planned; the window's calls hold the domains by
    # it (``Hypervisor.hold``) rather than resolve each name again
    uuids: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["quiesce"] = self.quiesce.value
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CreatePlan:
        return cls(
            group_id=doc["group_id"], name=doc["name"], description=doc["description"],
            quiesce=Quiesce(doc["quiesce"]), created_at=doc["created_at"],
            volumes=[VolumePlan(**v) for v in doc["volumes"]], live=list(doc["live"]),
            running=list(doc["running"]), stopped=list(doc["stopped"]),
            schedule=doc.get("schedule"), left_alone=dict(doc.get("left_alone", {})),
            uuids=dict(doc.get("uuids", {})),
        )

    def of(self, domain: str) -> list[VolumePlan]:
        return [v for v in self.volumes if v.domain == domain]


# --- plan: validation, no side effects ----------------------------------------

def check_name(name: str) -> None:
    if len(name) > MAX_NAME:
        raise BadRequest(f"name is longer than {MAX_NAME} characters", code="invalid_name")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise BadRequest("name contains control characters", code="invalid_name")


def _check_volume(domain: str, vol: Volume) -> None:
    if vol.source_type != "file":
        raise UnsupportedDisk(
            f"{domain}/{vol.target} is a {vol.source_type} disk; gasnap snapshots file-backed "
            "disks only"
        )
    if vol.shareable or vol.readonly:
        kind = "shareable" if vol.shareable else "read-only"
        raise UnsupportedDisk(f"{domain}/{vol.target} is {kind}; gasnap snapshots disks "
                              "that one domain writes")
    if vol.chain_error is not None:
        raise UnsupportedDisk(f"{domain}/{vol.target}: its chain cannot be read safely: "
                              f"{vol.chain_error}")
    if vol.format not in images.FORMATS:
        raise UnsupportedDisk(
            f"{domain}/{vol.target} is {vol.format or 'of unknown format'}; gasnap snapshots "
            "qcow2 and raw disks only"
        )


def _selected(dom: Domain, targets: list[str] | None) -> list[Volume]:
    if targets is None:
        return list(dom.volumes)
    chosen = []
    for target in dict.fromkeys(targets):
        vol = dom.volume(target)
        if vol is None:
            raise VolumeNotFound(f"domain {dom.name} has no disk {target}")
        chosen.append(vol)
    return chosen


def _check_quiesce(dom: Domain, quiesce: Quiesce) -> None:
    if quiesce is not Quiesce.REQUIRED:
        return
    if dom.state is DomainState.PAUSED:
        raise DomainStateConflict(f"{dom.name} is paused and cannot be quiesced "
                                  "(quiesce=required)")
    if dom.state is DomainState.RUNNING and dom.guest_agent is not AgentState.CONNECTED:
        error = AgentAbsent if dom.guest_agent is AgentState.ABSENT else AgentUnresponsive
        raise error(f"{dom.name}: guest agent {dom.guest_agent.value}; quiesce=required "
                    "cannot be met")


async def plan(ctx: Context, req: CreateRequest) -> CreatePlan:
    if not req.domains:
        raise BadRequest("no domain given", code="invalid_request")
    if len(set(req.domains)) != len(req.domains):
        raise BadRequest("a domain is named twice", code="invalid_request")
    unknown = set(req.disks) - set(req.domains)
    if unknown:
        raise BadRequest(f"disks given for domains not in the request: {sorted(unknown)}",
                         code="invalid_request")
    check_name(req.name)
    if len(req.description) > MAX_DESCRIPTION:
        raise BadRequest("description is too long", code="invalid_description")
    volumes: list[VolumePlan] = []
    live: list[str] = []
    running: list[str] = []
    stopped: list[str] = []
    left_alone: dict[str, list[str]] = {}
    uuids: dict[str, str] = {}
    # Only quiesce=required needs the guest agent's answer before anything is
    # touched; otherwise the freeze itself finds out (one ping less).
    probe = req.quiesce is Quiesce.REQUIRED
    for dom in await asyncio.gather(*(ctx.hv.get_domain(n, probe_agent=probe)
                                      for n in req.domains)):
        if dom.state is DomainState.RUNNING:
            live.append(dom.name)
            running.append(dom.name)
        elif dom.state is DomainState.PAUSED:
            live.append(dom.name)
        elif dom.state is DomainState.SHUTOFF:
            stopped.append(dom.name)
        else:
            raise DomainStateConflict(f"{dom.name} is {dom.state.value}; gasnap snapshots "
                                      "running, paused and stopped domains")
        _check_quiesce(dom, req.quiesce)
        uuids[dom.name] = dom.uuid
        chosen = _selected(dom, req.disks.get(dom.name))
        if not chosen:
            raise BadRequest(f"{dom.name} has no disk to snapshot", code="invalid_request")
        taken = {v.target for v in chosen}
        left_alone[dom.name] = [v.target for v in dom.volumes if v.target not in taken]
        for vol in chosen:
            _check_volume(dom.name, vol)
            try:
                size = await images.virtual_size(vol.active_file, vol.format)
            except (OSError, GasnapError) as err:
                raise UnsupportedDisk(f"{dom.name}/{vol.target}: cannot read "
                                      f"{vol.active_file}: {err}") from err
            preset = req.presets.get(vol.volume_id)
            snapshot_id = preset.snapshot_id if preset else str(uuid.uuid4())
            overlay = (preset.overlay if preset
                       else images.overlay_path(vol.active_file, snapshot_id))
            volumes.append(VolumePlan(
                snapshot_id, dom.name, vol.volume_id, vol.target, vol.active_file, vol.format,
                overlay, size, reuse=preset.reuse if preset else False,
            ))
    return CreatePlan(
        group_id=str(uuid.uuid4()) if len(volumes) > 1 else None,
        name=req.name, description=req.description, quiesce=req.quiesce,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        volumes=volumes, live=live, running=running, stopped=stopped, schedule=req.schedule,
        left_alone=left_alone, uuids=uuids,
    )


async def check_exclusive(ctx: Context, the_plan: CreatePlan) -> None:
    """No planned disk is a disk of another domain too (a multi-attached
    volume without ``<shareable/>``): its snapshot would switch one domain
    while the other kept writing into the point-in-time image."""
    others = await ctx.hv.files_in_use(besides=frozenset(the_plan.uuids.values()))
    for v in the_plan.volumes:
        if await images.real_path(v.image) in others:
            raise UnsupportedDisk(f"{v.domain}/{v.target}: {v.image} is a disk of another "
                                  "domain too; gasnap snapshots disks that one domain writes")


# --- execute -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    snapshots: list[SnapshotMeta]
    failure: GasnapError | None  # why the create as a whole failed, if it did


async def execute(ctx: Context, the_plan: CreatePlan) -> Outcome:
    op = await ctx.journal.begin(Kind.CREATE, CreateStep.PLANNED, {"plan": the_plan.to_dict()},
                                 volumes=[v.volume_id for v in the_plan.volumes])
    faults.hit("create:planned")
    consistency: dict[str, str] = {}
    failure: GasnapError | None = None
    recorded = False
    try:
        op = await _record(ctx, op, the_plan)
        recorded = True
        op = await _make_overlays(ctx, op, the_plan)
        # Every planned domain, stopped ones too: a name that changed hands
        # since the plan is refused here, never switched.
        async with ctx.hv.hold(the_plan.uuids):
            op, consistency = await _freeze_window(ctx, op, the_plan)
            op = await _switch_offline(ctx, op, the_plan)
    except GasnapError as err:
        failure = err
    except OSError as err:  # chown, chmod, link: the host refused
        failure = HostIOError(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "))
    reason = failure.message if failure else "the overlay did not become active"
    op = await ctx.journal.step(op, CreateStep.FINALIZING, consistency=consistency)
    faults.hit("create:finalizing")
    try:
        # Once every record exists, disks may change: from then on the
        # records must be finalized, however long the service is away.
        metas = await settle(ctx, the_plan, consistency, reason, persist=recorded)
    except Unavailable as err:
        # libvirt, or (before any record existed) the metadata service, is
        # away: the journal keeps the operation and its volumes, and the
        # agent's sweep settles it once both answer.
        log.error("create: cannot finalize now (%s); the sweep will", err.message)
        ctx.journal.release(op)
        return Outcome([], failure or err)
    await ctx.journal.finish(op)
    _prepare_spares(ctx, the_plan, metas)
    return Outcome(metas, failure)


class HostIOError(GasnapError):
    code = "host_io"


async def _record(ctx: Context, op: Operation, the_plan: CreatePlan) -> Operation:
    op = await ctx.journal.step(op, CreateStep.RECORDING)
    for v in the_plan.volumes:
        await ctx.metadata.create_snapshot_metadata(NewSnapshot(
            snapshot_id=v.snapshot_id, volume_id=v.volume_id, name=the_plan.name,
            description=the_plan.description, size=v.size, created_at=the_plan.created_at,
            domain=v.domain, group_id=the_plan.group_id, target=v.target,
            schedule=the_plan.schedule,
        ))
    faults.hit("create:recording")
    return op


async def _make_overlays(ctx: Context, op: Operation, the_plan: CreatePlan) -> Operation:
    op = await ctx.journal.step(op, CreateStep.OVERLAYS)
    # All at once, and every one finished before an error is raised: settle
    # must not remove an overlay that is still being written.
    results = await asyncio.gather(*(_make_overlay(ctx, v) for v in the_plan.volumes
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


def _prepare_spares(ctx: Context, the_plan: CreatePlan, metas: list[SnapshotMeta]) -> None:
    """Spares for the next snapshot of the live volumes whose overlay, made
    and named by gasnap, just became active (an overlay the caller made, as
    Cinder makes Nova's ``new_file``, is in a directory gasnap does not
    manage)."""
    available = {m.id for m in metas if m.status is Status.AVAILABLE}
    for v in the_plan.volumes:
        if (v.domain in the_plan.live and v.snapshot_id in available and not v.reuse
                and v.overlay == images.overlay_path(v.image, v.snapshot_id)):
            ctx.spares.prepare(images.spare_path(v.overlay), v.overlay, "qcow2", v.size)


async def _freeze_window(
    ctx: Context, op: Operation, the_plan: CreatePlan
) -> tuple[Operation, dict[str, str]]:
    """Freeze, switch every live domain, thaw.  Returns the consistency per
    domain.  The window owns its domains' freezes (``windows``): another
    window on one of them waits until this one has thawed."""
    async with ctx.windows.owning(the_plan.uuids.get(d, d) for d in the_plan.live):
        return await _owned_window(ctx, op, the_plan)


async def _owned_window(
    ctx: Context, op: Operation, the_plan: CreatePlan
) -> tuple[Operation, dict[str, str]]:
    consistency = {d: Consistency.CRASH.value for d in [*the_plan.live, *the_plan.stopped]}
    to_freeze = [] if the_plan.quiesce is Quiesce.OFF else list(the_plan.running)
    marks = [time.monotonic()]
    if to_freeze:
        try:
            await ctx.guard.arm(to_freeze, ctx.freeze_timeout, owner=op.id)
        except FreezeGuardError as err:
            if the_plan.quiesce is Quiesce.REQUIRED:
                raise QuiesceFailed(f"cannot freeze safely: {err.message}") from err
            log.warning("no freeze guard (%s): taking crash-consistent snapshots", err)
            to_freeze = []
    op = await ctx.journal.step(op, CreateStep.FREEZING, frozen=to_freeze)
    started = time.monotonic()
    marks.append(started)
    owned = to_freeze
    switch_errors: dict[str, str] = {}
    try:
        frozen, owned, stop = await _freeze(ctx, to_freeze, the_plan.quiesce)
        if stop is not None:
            raise stop
        marks.append(time.monotonic())
        for name in frozen:
            consistency[name] = Consistency.FILESYSTEM.value
        faults.hit("create:switching")
        switch_errors = await _switch_live(ctx, the_plan)
        marks.append(time.monotonic())
        faults.hit("create:switched")
    finally:
        await _thaw(ctx, owned, op.id)
        # A freeze that failed outright was never ours: only its guard goes.
        await _disarm(ctx, [d for d in to_freeze if d not in owned], op.id)
    marks.append(time.monotonic())
    log.debug("window of %s: arm %.1f ms, freeze %.1f ms, switch %.1f ms, thaw %.1f ms",
              ",".join(the_plan.live), *((b - a) * 1e3 for a, b in itertools.pairwise(marks)))
    if time.monotonic() - started >= ctx.freeze_timeout:
        # The guard may have thawed before the switch: no longer a frozen image.
        log.warning("freeze window exceeded %.1fs; recording crash consistency",
                    ctx.freeze_timeout)
        consistency = {d: Consistency.CRASH.value for d in consistency}
    if to_freeze:
        metrics.FREEZE_SECONDS.observe(time.monotonic() - started)
    op = await ctx.journal.step(op, CreateStep.THAWED, consistency=consistency)
    if switch_errors:
        raise SwitchFailed("; ".join(f"{d}: {m}" for d, m in switch_errors.items()))
    return op, consistency


class SwitchFailed(GasnapError):
    code = "snapshot_switch_failed"


async def _freeze(ctx: Context, domains: list[str], quiesce: Quiesce
                  ) -> tuple[list[str], list[str], BaseException | None]:
    """Freeze DOMAINS.  Returns those frozen; those whose freeze is ours to
    thaw: every one but those whose agent answered the freeze with an error
    (qemu-ga then froze nothing, or the guest was already frozen by someone
    else, whose freeze is not ours to end), while a timeout is ours (the
    guest may have frozen and answered late); and what must stop the create."""
    results = await asyncio.gather(
        *(ctx.agent.fsfreeze(d, ctx.freeze_timeout) for d in domains), return_exceptions=True
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


async def _switch_live(ctx: Context, the_plan: CreatePlan) -> dict[str, str]:
    """Switch every live domain; returns libvirt's error per domain that failed
    (what happened to its disks is judged later, from the live XML)."""
    results = await asyncio.gather(
        *(ctx.hv.switch_overlays(d, {v.target: v.overlay for v in the_plan.of(d)},
                                 the_plan.left_alone.get(d, []))
          for d in the_plan.live),
        return_exceptions=True,
    )
    errors = {}
    for name, result in zip(the_plan.live, results, strict=True):
        if isinstance(result, GasnapError):
            log.error("%s: snapshot failed: %s", name, result.message)
            errors[name] = result.message
        elif isinstance(result, BaseException):
            raise result
    return errors


async def _thaw(ctx: Context, domains: list[str], owner: str) -> None:
    """Thaw the domains whose freeze is ours.  The guard stays armed for any
    that cannot be thawed now, and thaws them at its deadline."""
    if not domains:
        return
    results = await asyncio.gather(
        *(ctx.agent.fsthaw(d, THAW_TIMEOUT) for d in domains), return_exceptions=True
    )
    thawed = []
    for name, result in zip(domains, results, strict=True):
        if isinstance(result, BaseException):
            log.error("%s: thaw failed (%s); the freeze guard will retry", name, result)
        else:
            thawed.append(name)
    await _disarm(ctx, thawed, owner)


async def _disarm(ctx: Context, domains: list[str], owner: str) -> None:
    if not domains:
        return
    try:
        await ctx.guard.disarm(domains, owner=owner)
    except FreezeGuardError as err:
        log.warning("freeze guard: %s", err.message)


async def _switch_offline(ctx: Context, op: Operation, the_plan: CreatePlan) -> Operation:
    if not the_plan.stopped:
        return op
    op = await ctx.journal.step(op, CreateStep.OFFLINE)
    for name in the_plan.stopped:
        try:
            await ctx.hv.define_overlays(name, {v.target: v.overlay for v in the_plan.of(name)})
        except GasnapError as err:
            log.error("%s: offline switch failed: %s", name, err.message)
    faults.hit("create:offline")
    return op
