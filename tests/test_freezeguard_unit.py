"""The guard's ownership rules where a real guest cannot show them on demand:
a deadline thaw still on its way to the guest (REVIEW-2 item 9)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from gasnap import freezeguard
from gasnap.freezeguard import _Guard
from gasnap.guestagent import GuestAgentError
from gasnap.hypervisor import Hypervisor


class _SlowThaw:
    """A guest agent whose thaw is answered only when the test says so."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()
        self.answer = asyncio.Event()
        self.thaws = 0

    async def fsthaw(self, name: str, timeout: float) -> int:
        self.thaws += 1
        self.sent.set()
        await self.answer.wait()
        return 2


class _Hv:
    def __init__(self) -> None:
        self.agent = _SlowThaw()


async def test_no_arm_while_a_deadline_thaw_is_on_its_way() -> None:
    """A thaw sent after a deadline may land at any moment until it
    returns: an arm in that time would have its fresh freeze undone by it,
    so it is refused; once the thaw returned, the next owner arms."""
    hv = _Hv()
    guard = _Guard(cast(Hypervisor, cast(Any, hv)))
    assert guard.arm(["dom"], 0.01, owner="first") is None
    await asyncio.wait_for(hv.agent.sent.wait(), 5)
    refused = guard.arm(["dom"], 30, owner="second")
    assert refused is not None and "being thawed" in refused
    assert "dom" not in guard.armed
    hv.agent.answer.set()
    await asyncio.wait_for(asyncio.gather(*guard.pending), 5)
    assert guard.arm(["dom"], 30, owner="second") is None
    assert guard.armed["dom"].owner == "second"
    assert hv.agent.thaws == 1  # the second owner's deadline is its own
    guard.disarm(["dom"], owner="second")


class _AwayThenBack:
    """A guest agent that cannot thaw until the test brings it back."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.tried = asyncio.Event()
        self.thawed = asyncio.Event()

    async def fsthaw(self, name: str, timeout: float) -> int:
        self.tried.set()
        if not self.back.is_set():
            raise GuestAgentError("guest agent not answering")
        self.thawed.set()
        return 2


async def test_a_later_owner_that_lets_go_unthawed_hands_the_thaw_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """REVIEW-2 item 9, its other side (outside review): a deadline thaw is
    retrying when a create arms the domain between two tries, and stops.
    The guest is still frozen, so the create's freeze is refused and it
    disarms without thawing.  The thaw the deadline owed is sent again,
    and lands once the agent answers: the guest is never left frozen."""
    monkeypatch.setattr(freezeguard, "THAW_PAUSE_MAX", 0.05)
    hv = _Hv()
    hv.agent = cast(Any, _AwayThenBack())
    agent = cast(_AwayThenBack, hv.agent)
    guard = _Guard(cast(Hypervisor, cast(Any, hv)))
    monkeypatch.setattr(guard, "_runs", _always)
    assert guard.arm(["dom"], 0.01, owner="first") is None
    await asyncio.wait_for(agent.tried.wait(), 5)
    while "dom" in guard.in_flight:
        await asyncio.sleep(0)
    assert guard.arm(["dom"], 30, owner="create") is None  # between two tries
    await asyncio.wait_for(asyncio.gather(*guard.pending), 5)  # the retrying stops
    assert "dom" in guard.owed and not agent.thawed.is_set()
    agent.back.set()
    guard.disarm(["dom"], owner="create")  # its freeze was refused: no thaw of its own
    await asyncio.wait_for(agent.thawed.wait(), 5)
    await asyncio.wait_for(asyncio.gather(*guard.pending), 5)
    assert not guard.owed


async def test_a_later_owner_that_thaws_pays_the_owed_thaw() -> None:
    """The later owner froze and thawed through the guard's connection: the
    guest is thawed, and nothing is sent again at its disarm."""
    hv = _Hv()
    guard = _Guard(cast(Hypervisor, cast(Any, hv)))
    guard.owed.add("dom")
    assert guard.arm(["dom"], 30, owner="create") is None
    calls: list[str] = []

    async def command(domain: str, command: str, arguments: Any, timeout: float) -> int:
        calls.append(command)
        return 1

    hv.agent.command = command  # type: ignore[attr-defined]
    monkeypatched = guard._command({"id": 1, "domain": "dom", "command": "guest-fsfreeze-thaw",
                                    "arguments": None, "timeout": 5})
    await monkeypatched
    guard.disarm(["dom"], owner="create")
    assert calls == ["guest-fsfreeze-thaw"] and not guard.owed and not guard.pending
    assert hv.agent.thaws == 0


async def _always(_name: str) -> bool:
    return True


async def test_an_owner_that_says_it_thawed_pays_the_owed_thaw() -> None:
    """On libvirt the owner thaws on a connection of its own and says so at
    its disarm: nothing is sent again, and the next arm is not kept waiting
    behind a thaw in flight."""
    hv = _Hv()
    guard = _Guard(cast(Hypervisor, cast(Any, hv)))
    guard.owed.add("dom")
    assert guard.arm(["dom"], 30, owner="create") is None
    guard.disarm(["dom"], owner="create", thawed=True)
    assert not guard.owed and not guard.pending and hv.agent.thaws == 0
    assert guard.arm(["dom"], 30, owner="next") is None
    guard.disarm(["dom"], owner="next", thawed=True)
