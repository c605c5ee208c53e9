"""A forced revert's power-off, with a fake hypervisor: the paths a real
guest does not take on demand (one that ignores the shutdown request, one
that refuses it, a paused one)."""

from __future__ import annotations

from typing import Any

import pytest

from gasnap.errors import Conflict
from gasnap.hypervisor import AgentState, Domain, DomainState
from gasnap.workflows import Context, revert


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
