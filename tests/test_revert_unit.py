"""A forced revert's power-off, with a fake hypervisor: the paths a real
guest does not take on demand (one that ignores the shutdown request, one
that refuses it, a paused one)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from gasnap.errors import Conflict, GasnapError
from gasnap.hypervisor import AgentState, Domain, DomainState, Layer, Volume
from gasnap.journal import Journal
from gasnap.workflows import Context, revert
from gasnap.workflows.revertplan import RevertPlan, RevertVolume
from gasnap.workflows.steps import Kind, RevertStep


class Machine:
    """A domain that powers off when told to, or never (IGNORES), or
    refuses to be asked (REFUSES)."""

    def __init__(self, state: DomainState, agent: AgentState, *, ignores: bool = False,
                 refuses: bool = False, stops_anyway: bool = False) -> None:
        self.state, self.agent = state, agent
        self.ignores, self.refuses, self.stops_anyway = ignores, refuses, stops_anyway
        self.calls: list[str] = []

    async def get_domain(self, name: str, **_: Any) -> Domain:
        return Domain(name, "u", self.state, self.agent)

    async def shutdown(self, name: str, *, agent: bool) -> None:
        self.calls.append("shutdown-agent" if agent else "shutdown-acpi")
        if self.refuses:
            if self.stops_anyway:  # a request from before a libvirtd restart lands
                self.state = DomainState.SHUTOFF
            raise Conflict("no", code="domain_not_running")
        if not self.ignores:
            self.state = DomainState.SHUTOFF

    async def destroy(self, name: str) -> None:
        self.calls.append("destroy")
        if self.state is DomainState.SHUTOFF:  # as libvirt answers
            raise Conflict("domain is not running", code="domain_state")
        self.state = DomainState.SHUTOFF


def context(machine: Machine) -> Context:
    return Context(machine, None, None, None, None, 10.0,  # type: ignore[arg-type]
                   shutdown_timeout=0.3)


@pytest.mark.parametrize(("machine", "calls"), [
    (Machine(DomainState.RUNNING, AgentState.CONNECTED), ["shutdown-agent"]),
    (Machine(DomainState.RUNNING, AgentState.ABSENT), ["shutdown-acpi"]),
    (Machine(DomainState.RUNNING, AgentState.CONNECTED, ignores=True),
     ["shutdown-agent", "destroy"]),
    (Machine(DomainState.RUNNING, AgentState.ABSENT, refuses=True),
     ["shutdown-acpi", "destroy"]),
    (Machine(DomainState.PAUSED, AgentState.UNRESPONSIVE), ["destroy"]),
    # Refused, yet off by the time of the destroy: libvirt's "not running"
    # is not a failure (the fault matrix's revert:before/libvirtd cell).
    (Machine(DomainState.RUNNING, AgentState.CONNECTED, refuses=True, stops_anyway=True),
     ["shutdown-agent", "destroy"]),
    (Machine(DomainState.SHUTOFF, AgentState.ABSENT), []),
])
async def test_power_off_is_graceful_first_and_bounded(machine: Machine,
                                                       calls: list[str]) -> None:
    await revert._power_off(context(machine), "d")
    assert machine.calls == calls
    assert machine.state is DomainState.SHUTOFF


class Unstartable(Machine):
    """A stopped domain whose start keeps failing (a disk QEMU will not open)."""

    def __init__(self) -> None:
        super().__init__(DomainState.SHUTOFF, AgentState.ABSENT)

    def hold(self, _domains: dict[str, str]) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # type: ignore[return-value]

    async def files_in_use(self, **_: Any) -> set[str]:
        return set()

    async def start(self, name: str) -> None:
        self.calls.append("start")
        raise GasnapError(f"{name}: cannot open its disk")


async def test_an_undo_that_cannot_start_the_domain_ends_bounded(tmp_path: Path) -> None:
    """REVIEW-2 (second review, item 9): recovery undoing a revert retried a
    start that keeps failing at every sweep, the volumes held for ever.  It
    gives up after MAX_ATTEMPTS, the domain left off on the chain it had."""
    machine = Unstartable()
    journal = Journal(tmp_path / "journal.db")
    ctx = Context(machine, None, None, journal, None, 10.0)  # type: ignore[arg-type]
    volume = RevertVolume("s", "d", "v", "vda", str(tmp_path / "image"), "qcow2",
                          str(tmp_path / "volume-v.r"), 1 << 20, before_id="b")
    planned = RevertPlan("s", [volume], {"d": "u"}, ["d"], ["d"])
    begun = await journal.begin(Kind.REVERT, RevertStep.STOPPING, planned.to_dict(),
                                volumes=["v"])
    journal.release(begun)  # the agent that began it is gone
    for _ in range(revert.MAX_ATTEMPTS):
        (op,) = await journal.unfinished()
        journal.claim(op)  # as a sweep takes it, and lets go when it fails
        with pytest.raises(GasnapError, match="cannot open"):
            await revert.resume(ctx, op)
        journal.release(op)
    (op,) = await journal.unfinished()
    await revert.resume(ctx, op)
    assert await journal.unfinished() == []
    assert machine.calls == ["start"] * revert.MAX_ATTEMPTS
    journal.close()


@pytest.mark.parametrize("switched", [True, False])
async def test_a_failure_at_the_switch_is_reported_as_what_the_revert_became(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switched: bool) -> None:
    """REVIEW-2 item 4: a group half switched when the switch failed is
    finished, not undone; the caller then hears the revert happened (it was
    told "failed" before, and the revert happened anyway).  Nothing switched:
    undone, and a failure."""
    calls: list[str] = []

    async def note(name: str, result: Any = None) -> Any:
        calls.append(name)
        return result

    async def any_switched(*_: Any) -> bool:
        return switched

    monkeypatch.setattr(revert, "_switched_any", any_switched)
    monkeypatch.setattr(revert, "_started_since", lambda *_: note("started_since", []))
    monkeypatch.setattr(revert, "_switch", lambda *_: note("switch"))
    monkeypatch.setattr(revert, "_start", lambda *_: note("start", {}))
    monkeypatch.setattr(revert, "_remove_overlays", lambda *_: note("remove_overlays"))
    monkeypatch.setattr(revert, "_restart", lambda *_: note("restart"))
    journal = Journal(tmp_path / "journal.db")
    ctx = Context(Unstartable(), None, None, journal, None, 10.0)  # type: ignore[arg-type]
    volume = RevertVolume("s", "d", "v", "vda", str(tmp_path / "image"), "qcow2",
                          str(tmp_path / "volume-v.r"), 1 << 20, before_id="b")
    planned = RevertPlan("s", [volume], {"d": "u"}, ["d"], ["d"])
    op = await journal.begin(Kind.REVERT, RevertStep.SWITCHING, planned.to_dict(),
                             volumes=["v"])
    assert await revert._undo(ctx, op, planned) == ({} if switched else None)
    assert calls == (["switch", "start"] if switched
                     else ["started_since", "remove_overlays", "restart"])
    assert await journal.unfinished() == []
    journal.close()


class Group:
    """Two stopped domains of a group, each with one disk on its old chain;
    someone starts the second (STARTED) before the switch."""

    def __init__(self, tmp_path: Path, started: str) -> None:
        self.tmp_path, self.started = tmp_path, started
        self.defined: list[str] = []

    async def get_domain(self, name: str, **_: Any) -> Domain:
        state = DomainState.RUNNING if name == self.started else DomainState.SHUTOFF
        old = Layer(str(self.tmp_path / f"volume-{name}.old"), "qcow2")
        return Domain(name, f"u-{name}", state, AgentState.ABSENT,
                      (Volume(f"v-{name}", "vda", f"v-{name}", "file", (old,)),))

    async def define_overlays(self, name: str, overlays: dict[str, str]) -> None:
        self.defined.append(name)


async def test_a_group_is_switched_only_once_every_domain_is_off(tmp_path: Path) -> None:
    """Outside review: someone started the second domain of a group after
    the first was switched; the revert, half switched, was then finished
    behind its caller's back.  Every domain is checked before the first is
    switched: none is, and the revert fails (and is undone)."""
    group = Group(tmp_path, started="d2")
    ctx = Context(group, None, None, None, None, 10.0)  # type: ignore[arg-type]
    volumes = [RevertVolume("s", d, f"v-{d}", "vda", str(tmp_path / f"volume-{d}"), "qcow2",
                            str(tmp_path / f"volume-{d}.r"), 1 << 20, before_id="b")
               for d in ("d1", "d2")]
    planned = RevertPlan("s", volumes, {"d1": "u-d1", "d2": "u-d2"}, ["d1", "d2"],
                         ["d1", "d2"])
    with pytest.raises(revert.RevertFailed, match="d2 is running"):
        await revert._switch(ctx, planned)
    assert group.defined == []
