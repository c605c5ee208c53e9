"""The freeze guard process against a real guest: it thaws through a libvirtd
restart, answers each request with its own reply, and lets only the owner of
a deadline disarm it (REVIEW item 7, R2)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

import libvirtd
from conftest import URI, freeze_status, wait_until
from gasnap.freezeguard import FreezeGuard, FreezeGuardError
from gasnap.hypervisor import Domain
from gasnap.virt import LibvirtHypervisor


@pytest.fixture
async def guard() -> AsyncIterator[FreezeGuard]:
    the_guard = FreezeGuard(URI)
    await the_guard.start()
    yield the_guard
    await the_guard.close()


async def thawed_within(hv: LibvirtHypervisor, name: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if await freeze_status(hv, name) == "thawed":
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{name} still frozen after {seconds}s"
        await asyncio.sleep(0.2)


async def test_the_guard_thaws_through_a_libvirtd_restart(
    hv: LibvirtHypervisor, guest: Domain, guard: FreezeGuard
) -> None:
    """The deadline passes while libvirtd is down: the guard keeps trying and
    thaws once libvirtd is back (it used to give up at once)."""
    managed = libvirtd.systemd_managed()
    await guard.arm([guest.name], 2.0, owner="test")
    await hv.agent.fsfreeze(guest.name, 10)
    try:
        libvirtd.stop()
        await asyncio.sleep(5)  # past the deadline, libvirtd away
    finally:
        libvirtd.start(managed)
    await thawed_within(hv, guest.name, 60)


async def test_only_the_owner_disarms_and_late_replies_are_dropped(
    hv: LibvirtHypervisor, guest: Domain, guard: FreezeGuard
) -> None:
    await guard.arm([guest.name], 3.0, owner="first")
    with pytest.raises(FreezeGuardError, match="armed by another"):
        await guard.arm([guest.name], 3.0, owner="second")
    await guard.disarm([guest.name], owner="second")  # not its deadline: still armed
    await hv.agent.fsfreeze(guest.name, 10)
    await thawed_within(hv, guest.name, 15)  # the first owner's deadline thawed it
    # A reply that comes after its request timed out is not taken for the next one.
    proc = guard._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(FreezeGuardError, match="did not answer"):
            await guard.arm([guest.name], 30.0, owner="late")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    with pytest.raises(FreezeGuardError, match="armed by another"):
        await guard.arm([guest.name], 30.0, owner="next")  # its own reply, not the late ok
    await guard.disarm([guest.name], owner="late")
    await guard.arm([guest.name], 30.0, owner="next")
    await guard.disarm([guest.name], owner="next")


async def test_a_later_arm_takes_over_a_deadline_thaw_that_still_retries(
    hv: LibvirtHypervisor, guest: Domain, guard: FreezeGuard
) -> None:
    """REVIEW-2 item 9: past a deadline the guard retries its thaw until it
    lands.  A later owner may arm the domain only between two tries (never
    while a thaw is being sent, which could land inside its freeze), and the
    retrying then stops: the new owner's thaw and deadline take over."""
    managed = libvirtd.systemd_managed()
    await guard.arm([guest.name], 1.0, owner="first")
    await hv.agent.fsfreeze(guest.name, 10)
    try:
        libvirtd.stop()
        await asyncio.sleep(3)  # past the deadline: the guard's thaw retries
        await wait_until(lambda: _arms(guard, guest.name, "second"), timeout=30)
    finally:
        libvirtd.start(managed)
    await thawed_within(hv, guest.name, 60)  # by the second owner's deadline
    await guard.disarm([guest.name], owner="second")


async def _arms(guard: FreezeGuard, name: str, owner: str) -> bool:
    """Whether OWNER can arm NAME now (no thaw of the guard's in flight)."""
    try:
        await guard.arm([name], 10.0, owner=owner)
    except FreezeGuardError:
        return False
    return True
