"""The guard's ownership rules where a real guest cannot show them on demand:
a deadline thaw still on its way to the guest (REVIEW-2 item 9)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from gasnap.freezeguard import _Guard
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
