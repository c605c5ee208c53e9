"""Crashes: the agent killed or hung while guests are frozen, and stopped at
every journal step of a create; a restart converges, guests thawed, data intact."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Agent, Rig, chain_of, create_snapshots, freeze_status, volume_files
from gasnap.client import ApiError
from gasnap.guestagent import GuestAgentError
from gasnap.hypervisor import Domain, Hypervisor
from gasnap.lab.workload import freeze_log, sh

FREEZE_TIMEOUT = 6


def post(agent: Agent, body: dict[str, object]) -> None:
    """POST a create; the agent may die before it answers."""
    try:
        agent.client.request("POST", "/v1/snapshots", body)
    except ApiError as err:
        assert err.code == "agent_unreachable", err


async def wait_frozen_then_thawed(hv: Hypervisor, name: str, limit: float, since: int
                                  ) -> float:
    """Seconds the guest stayed frozen, by its own fsfreeze hook (entries
    after SINCE): a freeze, then a thaw within LIMIT.  Read from the guest's
    log, not by asking qemu-ga meanwhile: on bare QEMU the guard holds the
    guest agent's one connection while the domain is armed."""
    deadline = time.monotonic() + 30 + limit
    while True:
        try:
            log = (await freeze_log(hv, name))[since:]
        except GuestAgentError:
            log = []  # the socket is held (bare QEMU): the guard is still at it
        events = [event for event, _ in log]
        if "freeze" in events and "thaw" in events[events.index("freeze"):]:
            frozen = log[events.index("freeze")][1]
            thawed = next(ns for event, ns in log[events.index("freeze"):] if event == "thaw")
            seconds = (thawed - frozen) / 1e9
            assert seconds < limit, f"the guest stayed frozen {seconds:.1f}s"
            return seconds
        assert time.monotonic() < deadline, f"no freeze and thaw of {name}: {log}"
        await asyncio.sleep(0.5)


async def guest_sha(hv: Hypervisor, name: str) -> str:
    return await sh(hv, name, "sync; sha256sum /data/marker /data1/marker")


async def check_converged(agent: Agent, hv: Hypervisor, guest: Domain,
                          files_before: dict[str, set[str]]) -> dict[str, dict[str, object]]:
    """No record left creating; available iff the overlay is the active layer;
    no overlay left that the chain does not use; guest thawed."""
    records = {r["target"]: r for r in agent.client.get(
        f"/v1/snapshots?domain={guest.name}")["snapshots"]}
    dom = await hv.get_domain(guest.name)
    for vol in dom.volumes:
        chain = [layer.path for layer in vol.chain]
        new_files = volume_files(vol.active_file) - files_before[vol.target]
        assert new_files <= set(chain), f"stray files: {new_files - set(chain)}"
        rec = records.get(vol.target)
        if rec is None:
            assert not new_files
            continue
        assert rec["status"] in ("available", "error"), rec
        if rec["status"] == "available":
            assert chain[:2] == [rec["file"], rec["image"]]
        else:
            assert not new_files
    assert await freeze_status(hv, guest.name) == "thawed"
    return records


@pytest.fixture
async def marked(rig: Rig) -> str:
    hv, guest = rig.hv, rig.guest
    await sh(hv, guest.name, "for d in /data /data1; do head -c 1048576 /dev/urandom "
                             "> $d/marker; done; sync")
    return await guest_sha(hv, guest.name)


async def test_sigkill_while_frozen_thaws_within_the_timeout(tmp_path: Path, rig: Rig) -> None:
    hv, guest = rig.hv, rig.guest
    agent = rig.new_agent(tmp_path, env={"GASNAP_TEST_FAULT": "create:switching"},
                          freeze_timeout=FREEZE_TIMEOUT)
    try:
        agent.wait_ready()
        since = len(await freeze_log(hv, guest.name))
        post(agent, {"domains": [guest.name], "quiesce": "required"})
        await wait_frozen_then_thawed(hv, guest.name, FREEZE_TIMEOUT + 2, since)
        assert agent.wait_exit() == -signal.SIGKILL
    finally:
        agent.stop()


async def test_a_hung_agent_is_thawed_by_the_guard_at_the_deadline(
    tmp_path: Path, rig: Rig
) -> None:
    hv, guest = rig.hv, rig.guest
    agent = rig.new_agent(tmp_path, env={"GASNAP_TEST_FAULT": "create:switching:stop"},
                          freeze_timeout=FREEZE_TIMEOUT)
    try:
        agent.wait_ready()
        since = len(await freeze_log(hv, guest.name))
        post(agent, {"domains": [guest.name], "quiesce": "required"})
        await wait_frozen_then_thawed(hv, guest.name, FREEZE_TIMEOUT + 2, since)
        # Thawed by the guard's deadline, not by the agent's death: the agent
        # is still there, stopped inside the freeze window.
        assert agent.proc.poll() is None
        assert "T" in Path(f"/proc/{agent.proc.pid}/stat").read_text().split()[2]
    finally:
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.wait_exit()
    restarted = rig.new_agent(tmp_path)
    try:
        restarted.wait_ready()
        recs = restarted.client.get(f"/v1/snapshots?domain={guest.name}")["snapshots"]
        assert {r["status"] for r in recs} == {"error"}
    finally:
        restarted.stop()


# Where the agent dies, and what the records must say after the restart.
STEPS = [
    ("create:planned", None),
    ("create:recording", "error"),
    ("create:overlays", "error"),
    ("create:switching", "error"),
    ("create:switched", "available/crash"),  # switched, but not proven while frozen
    ("create:finalizing", "available/filesystem"),
]


@pytest.mark.parametrize(("point", "expected"), STEPS)
async def test_stop_at_every_journal_step_then_recover(
    tmp_path: Path, rig: Rig, marked: str, point: str, expected: str | None,
) -> None:
    hv, guest = rig.hv, rig.guest
    files_before = {v.target: volume_files(v.active_file)
                    for v in (await hv.get_domain(guest.name)).volumes}
    chains = {v.target: await chain_of(hv, guest.name, v.target) for v in guest.volumes}
    agent = rig.new_agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    try:
        agent.wait_ready()
        post(agent, {"domains": [guest.name], "quiesce": "required"})
        assert agent.wait_exit() == -signal.SIGKILL
    finally:
        agent.stop()
    restarted = rig.new_agent(tmp_path)
    try:
        restarted.wait_ready()
        records = await check_converged(restarted, hv, guest, files_before)
        outcome = {f"{r['status']}/{r['consistency']}" if r["status"] == "available"
                   else r["status"] for r in records.values()}
        assert outcome == ({expected} if expected else set()), records
        if expected in (None, "error"):
            for target, chain in chains.items():
                assert await chain_of(hv, guest.name, target) == chain
        assert await guest_sha(hv, guest.name) == marked
        # And the agent works normally afterwards.
        task = create_snapshots(restarted, {"domains": [guest.name], "quiesce": "required"})
        assert task["state"] == "succeeded", task
    finally:
        restarted.stop()
