"""Reverting: the volumes of a snapshot (or its whole group) go back to it.

``execute`` runs a plan (``revertplan``), writing each step to the journal
before taking it:

  planned → stopping (live domains: graceful shutdown through the guest
            agent or ACPI, bounded; destroy as the last resort)
          → before (the state being left kept as ``before-revert``
            snapshots: a create of its own, once the guest is off, so that
            they hold its last write; a memory revert keeps it first, RAM
            and all, and then destroys the guest)
          → overlays (a fresh qcow2 on each snapshot's image, relative
            backing pointer, format named)
          → switching (each persistent definition points at its overlays;
            the chain is checked from the domain's XML afterwards)
          → starting (the domains that ran, unless told otherwise)

Nothing below the new overlays is modified: later snapshots stay as another
branch of the volume's tree.  A failure before the switch removes the new
overlays and starts again the domains that were running; ``resume`` does the
same after a crash before the switch, and finishes the switch and the start
after one during it.  A domain with saved RAM in the group is restored from
it (onto the new overlays, then thawed) instead of booted, and such a revert
is finished rather than undone once its domains were destroyed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import faults, images, qemuimg
from ..errors import GasnapError, NotFound, Unavailable, from_os_error
from ..freezeguard import FreezeGuardError
from ..guestagent import THAW_TIMEOUT, AgentCommandFailed, GuestAgentError
from ..hypervisor import AgentState, DomainChanged, DomainState
from ..journal import Operation
from ..metadata import SnapshotMeta, Status
from . import Context, create, createplan, outage, space
from .revertplan import RevertPlan
from .steps import Kind, RevertStep

log = logging.getLogger(__name__)

STATE_POLL = 0.5
DESTROY_WAIT = 30.0
MAX_ATTEMPTS = 3  # recovery's tries to finish a revert before it gives up


class RevertFailed(GasnapError):
    code = "revert_failed"


@dataclass(frozen=True)
class Outcome:
    before: list[SnapshotMeta]  # the before-revert snapshots kept
    failure: GasnapError | None = None  # why the volumes did not go back, if they did not
    phases: dict[str, float] = field(default_factory=dict)  # seconds each step took
    # domains restored from RAM: filesystems thawed, or None when the agent
    # did not answer in time and the freeze guard's deadline thaws them
    thawed: dict[str, int | None] = field(default_factory=dict)


async def execute(ctx: Context, planned: RevertPlan) -> Outcome:
    op = await ctx.journal.begin(Kind.REVERT, RevertStep.PLANNED, planned.to_dict(),
                                 volumes=sorted(planned.holds))
    faults.hit("revert:planned")
    before: list[SnapshotMeta] = []
    clock = _Clock()
    try:
        async with ctx.hv.hold(planned.uuids):
            if planned.memory:
                # The state left is the instant the RAM is saved: kept while
                # the guest runs, then it is destroyed at once.
                op = await clock.step(ctx, op, RevertStep.BEFORE)
                before = await _keep_current_state(ctx, planned)
                faults.hit("revert:before")
            else:
                await _records_answer(ctx, planned)
            # Disks alone: the state left is the last byte the guest wrote,
            # its power-off's flush included, so it is kept once it is off.
            op = await clock.step(ctx, op, RevertStep.STOPPING)
            await outage.ride_out(ctx, "revert: stop", lambda: _stop(ctx, planned))
            faults.hit("revert:stopping")
            if not planned.memory:
                op = await clock.step(ctx, op, RevertStep.BEFORE)
                before = await outage.ride_out(ctx, "revert: keep the state left",
                                               lambda: _keep_current_state(ctx, planned))
                faults.hit("revert:before")
            op = await clock.step(ctx, op, RevertStep.OVERLAYS)
            await _make_overlays(ctx, planned)
            faults.hit("revert:overlays")
            op = await clock.step(ctx, op, RevertStep.SWITCHING)
            await outage.ride_out(ctx, "revert: switch", lambda: _switch(ctx, planned))
            faults.hit("revert:switching")
            op = await clock.step(ctx, op, RevertStep.STARTING)
            thawed = await outage.ride_out(ctx, "revert: start", lambda: _start(ctx, planned))
    except GasnapError as err:
        err = await space.explain_any(err, planned.directories(), ctx.min_free)
        log.error("revert to %s failed: %s", planned.snapshot_id, err.message)
        log.debug("traceback", exc_info=True)
        finished = await _undo(ctx, op, planned)
        if finished is not None:
            # Half switched: the revert was finished, not undone; its caller
            # hears that it happened, never a failure that happened anyway.
            log.warning("revert to %s finished after %s", planned.snapshot_id, err.message)
            return Outcome(before, phases=clock.done(op), thawed=finished)
        return Outcome(before, err, clock.done(op))
    await ctx.journal.finish(op)
    return Outcome(before, phases=clock.done(op), thawed=thawed)


class _Clock:
    """How long each step took (monotonic), for the task's result."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._since = time.monotonic()

    async def step(self, ctx: Context, op: Operation, step: RevertStep) -> Operation:
        if op.step == RevertStep.PLANNED:
            self._since = time.monotonic()  # the plan is not a step the task times
        else:
            self.done(op)
        return await ctx.journal.step(op, step)

    def done(self, op: Operation) -> dict[str, float]:
        now = time.monotonic()
        self.phases[op.step] = round(now - self._since, 3)
        self._since = now
        return self.phases


# --- the steps ------------------------------------------------------------------


async def _keep_current_state(ctx: Context, planned: RevertPlan) -> list[SnapshotMeta]:
    before = await createplan.plan(ctx, planned.before_request())
    outcome = await create.execute(ctx, before)
    failed = [m for m in outcome.snapshots if m.status is not Status.AVAILABLE]
    if outcome.failure is not None or failed or not outcome.snapshots:
        reason = outcome.failure.message if outcome.failure else (
            failed[0].error if failed else "no snapshot was recorded")
        raise RevertFailed(f"the state being left could not be kept ({reason}); "
                           "nothing was reverted")
    return outcome.snapshots


async def _records_answer(ctx: Context, planned: RevertPlan) -> None:
    """The state left is recorded after the power-off: a metadata service
    that does not answer now fails the revert before any guest goes down."""
    try:
        await ctx.metadata.list_snapshots(volume_id=planned.volumes[0].volume_id)
    except Unavailable as err:
        raise RevertFailed(f"the state being left could not be kept ({err.message}); "
                           "nothing was reverted") from err


async def _stop(ctx: Context, planned: RevertPlan) -> None:
    """A domain restored from saved RAM is destroyed at once: its state has
    just been kept, RAM included, and nothing of the running guest is
    wanted (a shutdown would only write to disks that are left)."""
    await asyncio.gather(*(
        _destroy(ctx, name, planned.uuids.get(name)) if name in planned.memory
        else _power_off(ctx, name, planned.uuids.get(name)) for name in planned.stop))


async def _destroy(ctx: Context, name: str, uuid: str | None = None) -> None:
    try:
        await ctx.hv.destroy(name)
    except GasnapError as err:
        # Off between the state read and the destroy (a shutdown asked for
        # before a libvirtd restart that landed after it): off is the goal.
        if await _state(ctx, name, uuid) is not DomainState.SHUTOFF:
            raise
        log.info("%s: already off (%s)", name, err.message)
    if not await _shut_off_within(ctx, name, DESTROY_WAIT, uuid):
        raise RevertFailed(f"{name} is still running after destroy")


async def _power_off(ctx: Context, name: str, uuid: str | None = None) -> None:
    """Gracefully when the guest can (through its agent, else ACPI), within
    ``shutdown_timeout``; destroyed past it, or at once when paused.  UUID:
    the planned domain's, so that its state is read whatever its name."""
    dom = await ctx.hv.get_domain(name, uuid=uuid)
    if dom.state is DomainState.SHUTOFF:
        return
    if dom.state is DomainState.RUNNING:
        try:
            await ctx.hv.shutdown(name, agent=dom.guest_agent is AgentState.CONNECTED)
        except GasnapError as err:
            log.warning("%s: graceful shutdown refused (%s)", name, err.message)
        else:
            if await _shut_off_within(ctx, name, ctx.shutdown_timeout, uuid):
                log.info("%s: shut down for a revert", name)
                return
        log.warning("%s did not power off within %.0f s: destroying it", name,
                    ctx.shutdown_timeout)
    await _destroy(ctx, name, uuid)


async def _shut_off_within(ctx: Context, name: str, seconds: float,
                           uuid: str | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if await _state(ctx, name, uuid) is DomainState.SHUTOFF:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(STATE_POLL)


async def _state(ctx: Context, name: str, uuid: str | None) -> DomainState:
    return (await ctx.hv.get_domain(name, uuid=uuid)).state


async def _make_overlays(ctx: Context, planned: RevertPlan) -> None:
    for v in planned.volumes:
        await qemuimg.create_overlay(v.overlay, images.relative_pointer(v.overlay, v.image),
                                     v.image_format, v.size)
        try:
            await images.adopt_owner(v.overlay, v.image)
        except OSError as err:
            # A GasnapError, so that the revert is undone (its domains started
            # again), not left half done until the agent restarts.
            raise from_os_error(err) from err


async def _switch(ctx: Context, planned: RevertPlan) -> None:
    """Idempotent: a domain already on its new overlays (switched, maybe
    started, before a crash or a failure after) is left as it is."""
    todo = [name for name in planned.domains if await _off_the_new_overlays(ctx, planned, name)]
    # Every domain checked before the first is switched: one started by
    # someone else fails the switch with none switched, so the revert is
    # undone, not half done and then finished behind its caller's back.
    for name in todo:
        await _check_volumes(ctx, planned, name)
    for name in todo:
        await ctx.hv.define_overlays(name, {v.target: v.overlay for v in planned.of(name)})
        wrong = await _off_the_new_overlays(ctx, planned, name)
        if wrong:
            raise RevertFailed(f"{name}: after the switch {wrong}")


async def _check_volumes(ctx: Context, planned: RevertPlan, name: str) -> None:
    """NAME is still off, and each target the revert switches still holds
    the volume planned: a disk detached and its target reused since (as
    Nova does) is never switched onto another volume's image."""
    dom = await ctx.hv.get_domain(name, uuid=planned.uuids.get(name))
    if dom.state is not DomainState.SHUTOFF:
        raise RevertFailed(f"{name} is {dom.state.value} (started by someone else since it was "
                           "stopped); not switched")
    for v in planned.of(name):
        vol = dom.volume(v.target)
        if vol is None or vol.volume_id != v.volume_id:
            raise RevertFailed(f"{name}/{v.target} is no longer volume {v.volume_id} "
                               f"({vol.volume_id if vol else 'no disk'} now); not switched")


async def _off_the_new_overlays(ctx: Context, planned: RevertPlan, name: str) -> str:
    """Why NAME's chain (as it runs, or its definition) is not each new
    overlay on its snapshot's image; empty when it is."""
    dom = await ctx.hv.get_domain(name, uuid=planned.uuids.get(name))
    for v in planned.of(name):
        vol = dom.volume(v.target)
        chain = [layer.path for layer in vol.chain] if vol is not None else []
        if chain[:2] != [v.overlay, v.image]:
            return f"the chain of {v.target} is {chain}, expected {v.overlay} on {v.image}"
    return ""


async def _start(ctx: Context, planned: RevertPlan) -> dict[str, int | None]:
    """Start (or restore) the domains to start; every domain restored from
    RAM and left running is thawed, whatever its agent's state at plan time
    (a domain off then had no agent, yet its RAM may have been saved
    frozen).  Returns what each restored domain's thaw did."""
    restored = []
    for name in planned.start:
        if await _state(ctx, name, planned.uuids.get(name)) is not DomainState.SHUTOFF:
            if name in planned.memory:
                restored.append(name)  # restored before a crash: maybe still frozen
            continue
        memory = planned.memory.get(name)
        if memory is None:
            await ctx.hv.start(name)
            continue
        await ctx.hv.restore(name, memory, {v.target: v.overlay for v in planned.of(name)},
                             paused=name in planned.paused)
        restored.append(name)
    thaws = [name for name in restored if name not in planned.paused]
    counts = await asyncio.gather(*(_thaw(ctx, name, planned.snapshot_id) for name in thaws))
    await asyncio.gather(*(_agent_back(ctx, name) for name in planned.agents
                           if name not in planned.memory and name not in planned.paused))
    return dict(zip(thaws, counts, strict=True))


async def _thaw(ctx: Context, name: str, owner: str) -> int | None:
    """RAM saved while frozen comes back frozen: the guard is armed first
    (its deadline thaws the guest and retries until it lands, even if this
    agent dies now), then the guest is thawed as soon as its agent answers
    (bounded, as ``_agent_back``).  The count thawed (0: it was not
    frozen), or None when the agent did not answer in time and the guard
    was left armed to thaw it.  A guest restored paused is thawed by
    whoever resumes it."""
    owner = f"restore:{owner}"
    try:
        await ctx.guard.arm([name], ctx.freeze_timeout, owner=owner)
    except FreezeGuardError as err:
        log.error("%s: restored, but no freeze guard (%s); thawing it without", name,
                  err.message)
    deadline = time.monotonic() + ctx.shutdown_timeout
    while True:
        try:
            count = await ctx.agent.fsthaw(name, THAW_TIMEOUT)
        except AgentCommandFailed as err:
            log.info("%s: restored; nothing to thaw (%s)", name, err.message)
            count = 0
        except GuestAgentError as err:
            if time.monotonic() >= deadline:
                log.error("%s: restored, but its agent did not answer to be thawed (%s); "
                          "the freeze guard thaws it at its deadline", name, err.message)
                return None
            await asyncio.sleep(STATE_POLL)
            continue
        log.info("%s: restored from memory; %d filesystems thawed", name, count)
        break
    try:
        await ctx.guard.disarm([name], owner=owner, thawed=True)
    except FreezeGuardError as err:
        log.warning("%s: thawed; freeze guard: %s", name, err.message)
    return count


async def _agent_back(ctx: Context, name: str) -> None:
    """Wait (bounded) for the guest agent of a started domain to answer: the
    guest is back.  One that does not answer in time is reported, not failed:
    the revert itself is done."""
    deadline = time.monotonic() + ctx.shutdown_timeout
    while True:
        try:
            await ctx.agent.ping(name)
            return
        except GuestAgentError as err:
            if time.monotonic() >= deadline:
                log.warning("%s started, but its guest agent did not answer within %.0f s "
                            "(%s)", name, ctx.shutdown_timeout, err.message)
                return
        except GasnapError as err:
            # Paused already (QEMU pauses a guest whose disk is full), or
            # gone: reported; the revert itself is done.
            log.warning("%s started, but %s", name, err.message)
            return
        await asyncio.sleep(STATE_POLL)


# --- undoing and resuming -----------------------------------------------------------


async def _undo(ctx: Context, op: Operation, planned: RevertPlan
                ) -> dict[str, int | None] | None:
    """Settle a revert that failed at OP's step (see ``_settle``): what
    ``_start`` reported when that finished it, None when it undid it."""
    try:
        finished = await outage.ride_out(ctx, "revert: undo",
                                         lambda: _settle(ctx, planned, RevertStep(op.step)))
    except GasnapError as err:
        log.error("revert to %s: cannot settle now (%s); recovery will", planned.snapshot_id,
                  err.message)
        ctx.journal.release(op)
        return None
    await ctx.journal.finish(op)
    return finished


async def _settle(ctx: Context, planned: RevertPlan, step: RevertStep
                  ) -> dict[str, int | None] | None:
    """Before the switch the revert is undone: the new overlays go and the
    domains that ran run again, on the chain they left; so is one that
    failed at the switch before any domain was on its new overlays.  Once
    one is, the switch and the start are finished (a group half switched is
    worse than either).  A memory revert is finished from the moment its domains
    were destroyed: booting them on the chain they left would throw away
    the RAM just kept, for a crashed disk; only if that cannot be done are
    they booted on the chain they left.  Finished: what ``_start`` reported
    (the domains thawed); undone: None."""
    if step is RevertStep.SWITCHING and not await _switched_any(ctx, planned):
        started = await _started_since(ctx, planned)
        if started or not planned.memory:
            # Nothing was switched: the revert has not happened, and it never
            # will behind its caller's back (a domain started meanwhile would
            # otherwise be rolled back at its next shut-off).
            log.warning("revert to %s undone before its switch%s", planned.snapshot_id,
                        f" ({', '.join(started)} started meanwhile)" if started else "")
            await _remove_overlays(ctx, planned)
            await _restart(ctx, planned)
            return None
    if step in (RevertStep.SWITCHING, RevertStep.STARTING):
        await _switch(ctx, planned)
        return await _start(ctx, planned)
    if planned.memory and step in (RevertStep.STOPPING, RevertStep.OVERLAYS):
        try:
            await _stop(ctx, planned)
            await _make_overlays(ctx, planned)
            await _switch(ctx, planned)
            return await _start(ctx, planned)
        except GasnapError as err:
            log.error("revert to %s could not be finished (%s): booting the domains on "
                      "the chain they left", planned.snapshot_id, err.message)
    await _remove_overlays(ctx, planned)
    await _restart(ctx, planned)
    return None


async def _switched_any(ctx: Context, planned: RevertPlan) -> bool:
    """Whether any domain of the plan is on its new overlays already."""
    for name in planned.domains:
        if not await _off_the_new_overlays(ctx, planned, name):
            return True
    return False


async def _started_since(ctx: Context, planned: RevertPlan) -> list[str]:
    """The domains of the plan that run now, though the revert left them off
    (someone started them between the stop and the switch)."""
    return [name for name in planned.domains
            if await _state(ctx, name, planned.uuids.get(name)) is not DomainState.SHUTOFF]


async def _remove_overlays(ctx: Context, planned: RevertPlan) -> None:
    in_use = await ctx.hv.files_in_use()
    for v in planned.volumes:
        if await images.real_path(v.overlay) in in_use:
            log.error("%s is in a chain: kept", v.overlay)
            continue
        await asyncio.to_thread(Path(v.overlay).unlink, missing_ok=True)


async def _restart(ctx: Context, planned: RevertPlan) -> None:
    """Start again the domains the revert stopped and would have started."""
    for name in planned.stop:
        if (name in planned.start
                and await _state(ctx, name, planned.uuids.get(name)) is DomainState.SHUTOFF):
            await ctx.hv.start(name)


async def resume(ctx: Context, op: Operation) -> None:
    """Settle a revert the journal shows unfinished (see the module's
    docstring); a planned domain renamed or gone is left as it is."""
    planned = RevertPlan.from_dict(op.payload["plan"])
    step = RevertStep(op.step)
    if step is RevertStep.PLANNED:
        await ctx.journal.finish(op)
        return
    made = await asyncio.to_thread(lambda: all(Path(v.overlay).exists()
                                               for v in planned.volumes))
    if step in (RevertStep.SWITCHING, RevertStep.STARTING) and not made:
        step = RevertStep.OVERLAYS  # never switched: nothing to switch to
    finishing = step in (RevertStep.SWITCHING, RevertStep.STARTING) or (
        planned.memory and step in (RevertStep.STOPPING, RevertStep.OVERLAYS))
    attempts = op.payload.get("attempts", 0) + 1
    try:
        async with ctx.hv.hold(planned.uuids):
            if attempts <= MAX_ATTEMPTS:
                op = await ctx.journal.step(op, op.step, attempts=attempts)
                if step is RevertStep.BEFORE:
                    # Nothing of the revert's own happened but, for a disk-only
                    # revert, the stop: its domains run again.  The
                    # before-revert create is an operation of its own.
                    await _restart(ctx, planned)
                else:
                    await _settle(ctx, planned, step)
            elif finishing:
                await _give_up(ctx, planned, attempts - 1)
            else:
                # Undone but for a start that keeps failing: the domains stay
                # off on the chain they had, and their volumes are free.
                log.error("revert to %s: undone, but %s could not be started again in %d "
                          "tries; left off on the chain they had", planned.snapshot_id,
                          ", ".join(planned.stop) or "no domain", attempts - 1)
    except (NotFound, DomainChanged) as err:
        log.error("recovery: revert to %s: %s; left as it is", planned.snapshot_id,
                  err.message)
    await ctx.journal.finish(op)


async def _give_up(ctx: Context, planned: RevertPlan, tried: int) -> None:
    """A revert that recovery could not finish in TRIED tries (a memory file
    QEMU will not load, a start that keeps failing) ends: each domain still
    off goes back to the chain it left (its before-revert snapshot's
    overlay) and boots cold if it ran, or stays off if that cannot be done;
    either way the journal lets go of its volumes."""
    log.error("revert to %s could not be finished in %d tries: back to the chains the "
              "domains left", planned.snapshot_id, tried)
    for name in planned.domains:
        try:
            await _back_to_the_chain_left(ctx, planned, name)
        except Unavailable:
            raise  # libvirtd away: the next sweep gives up again
        except GasnapError as err:
            log.error("%s: left off, on the revert's overlays: %s", name, err.message)
    await _remove_overlays(ctx, planned)


async def _back_to_the_chain_left(ctx: Context, planned: RevertPlan, name: str) -> None:
    if await _state(ctx, name, planned.uuids.get(name)) is not DomainState.SHUTOFF:
        log.error("%s runs (someone started it): left as it is", name)
        return
    # The before-revert snapshot's overlay, where the plan put it (next to
    # the revert's own, named for its id): never a path read from a record.
    left = {v.target: images.overlay_path(v.overlay, v.volume_id, v.before_id)
            for v in planned.of(name)}
    missing = [p for p in left.values() if not await asyncio.to_thread(os.path.exists, p)]
    if missing:
        raise RevertFailed(f"the chain {name} left is gone ({', '.join(missing)})")
    await _check_volumes(ctx, planned, name)
    await ctx.hv.define_overlays(name, left)
    dom = await ctx.hv.get_domain(name, uuid=planned.uuids.get(name))
    for target, path in left.items():
        vol = dom.volume(target)
        if vol is None or vol.active_file != path:
            raise RevertFailed(f"{name}/{target} is not on {path} after the switch back")
    ran = name in planned.stop and name in planned.start
    if ran:
        await ctx.hv.start(name)
    log.error("%s: back on the chain it left, %s", name, "started cold" if ran else "off")
