"""Memory snapshots on lab guests: the RAM and device state saved with the
disks in one instant, and a revert that brings the guest back running at
that instant (no reboot: same boot id, a RAM-only file back, a counter
resuming from its old value)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    PREFIX,
    Agent,
    create_snapshots,
    delete_snapshot,
    freeze_status,
    gasnap,
    hv_call,
    wait_task,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain, DomainState
from gasnap.lab.guests import Lab
from gasnap.lab.verify import fsck_snapshot
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor

COUNTER = ("(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done)"
           " >/dev/null 2>&1 &")


@pytest.fixture(scope="module")
async def rammed(lab: Lab) -> AsyncIterator[Domain]:
    dom = await lab.up(f"{PREFIX}memory", disks=1, size_mib=32)
    yield dom
    await lab.down(dom.name)


async def counter(hv: LibvirtHypervisor, name: str) -> int:
    return int((await sh(hv, name, "cat /tmp/counter")).strip())


async def boot_id(hv: LibvirtHypervisor, name: str) -> str:
    return (await sh(hv, name, "cat /proc/sys/kernel/random/boot_id")).strip()


def revert(agent: Agent, snapshot_id: str, **body: Any) -> dict[str, Any]:
    task = agent.client.request("POST", f"/v1/snapshots/{snapshot_id}/revert", body)["task"]
    return wait_task(agent, task["id"], timeout=300)


async def test_a_memory_snapshot_brings_the_guest_back_running(
    agent: Agent, hv: LibvirtHypervisor, rammed: Domain
) -> None:
    name = rammed.name
    booted = await boot_id(hv, name)
    await sh(hv, name, f"echo M > /tmp/marker; echo D > /data/d; sync; {COUNTER}")
    await asyncio.sleep(1)
    out = gasnap("--api", agent.api, "snapshot", "create", name, "--memory", "--name", "ram",
                 "--json")
    task = json.loads(out.stdout)
    assert task["state"] == "succeeded", task
    (snap,) = task["result"]["snapshots"]
    assert snap["consistency"] == "memory"
    assert set(task["result"]["pause_ms"]) == {name}
    assert os.path.exists(snap["memory_file"])
    assert snap["memory_size"] == os.stat(snap["memory_file"]).st_size > 0
    assert (await fsck_snapshot(snap)).clean  # frozen around the save: clean alone too
    at_snapshot = await counter(hv, name)

    await sh(hv, name, "rm /tmp/marker /data/d; sync")
    await asyncio.sleep(2)
    moved_on = await counter(hv, name)
    assert moved_on > at_snapshot + 3

    task = revert(agent, snap["id"], force=True)
    assert task["state"] == "succeeded", task
    assert (await hv.get_domain(name)).state is DomainState.RUNNING
    assert await boot_id(hv, name) == booted  # not rebooted
    assert (await sh(hv, name, "cat /tmp/marker /data/d")).split() == ["M", "D"]
    resumed = await counter(hv, name)
    assert at_snapshot <= resumed < moved_on
    (before_id,) = task["result"]["before"]
    before = agent.client.get(f"/v1/snapshots/{before_id}")
    assert (before["origin"], before["consistency"]) == ("before-revert", "memory")

    # Undo: back to the guest that had removed them, still without a reboot.
    task = revert(agent, before_id, force=True)
    assert task["state"] == "succeeded", task
    assert await boot_id(hv, name) == booted
    assert "marker" not in await sh(hv, name, "ls /tmp")
    assert await counter(hv, name) >= moved_on

    # A memory file cut short is refused before anything changes.
    memory = Path(snap["memory_file"])
    chain = [layer.path for layer in (await hv.get_domain(name)).volumes[0].chain]
    await asyncio.to_thread(os.truncate, memory, memory.stat().st_size // 2)
    with pytest.raises(ApiError) as refused:
        agent.client.request("POST", f"/v1/snapshots/{snap['id']}/revert", {"force": True})
    assert (refused.value.details["status"], refused.value.code) == (409, "memory_unusable")
    assert [layer.path for layer in (await hv.get_domain(name)).volumes[0].chain] == chain
    assert (await hv.get_domain(name)).state is DomainState.RUNNING

    # Deleting the snapshot removes its memory file with it.
    task = delete_snapshot(agent, snap["id"])
    assert task["state"] == "succeeded", task
    assert not memory.exists()


async def test_memory_of_stopped_and_paused_domains(
    agent: Agent, hv: LibvirtHypervisor, rammed: Domain
) -> None:
    """Paused: saved and restored paused.  Shut off: disks only, with a
    warning (as Kimchi does)."""
    name = rammed.name
    await hv_call(hv, name, "suspend")
    try:
        task = create_snapshots(agent, {"domains": [name], "memory": True})
        assert task["state"] == "succeeded", task
        (snap,) = task["result"]["snapshots"]
        assert (snap["consistency"], snap["domain_state"]) == ("memory", "paused")
        task = revert(agent, snap["id"], force=True)
        assert task["state"] == "succeeded", task
        assert (await hv.get_domain(name)).state is DomainState.PAUSED
    finally:
        await hv_call(hv, name, "resume")
    await hv.destroy(name)
    task = create_snapshots(agent, {"domains": [name], "memory": True})
    assert task["state"] == "succeeded", task
    assert task["result"]["warnings"] == [f"{name} is shut off: its snapshot holds its "
                                          "disks only"]
    assert task["result"]["snapshots"][0]["memory_file"] is None
    await hv.start(name)
    await Lab(hv).wait_for_agent(name, 180)


async def test_a_shut_off_domain_reverted_to_its_ram_comes_back_thawed(
    agent: Agent, hv: LibvirtHypervisor, rammed: Domain
) -> None:
    """R5: the RAM was saved frozen; the domain was off at plan time, so its
    agent was absent then.  The restored guest is thawed all the same, and
    the task says so."""
    name = rammed.name
    booted = await boot_id(hv, name)
    task = create_snapshots(agent, {"domains": [name], "memory": True})
    assert task["state"] == "succeeded", task
    (snap,) = task["result"]["snapshots"]
    subprocess.run(["virsh", "-q", "shutdown", name, "--mode", "agent"], check=True)
    await wait_until(lambda: hv_state(hv, name, DomainState.SHUTOFF), timeout=120)
    task = revert(agent, snap["id"])
    assert task["state"] == "succeeded", task
    assert (await hv.get_domain(name)).state is DomainState.RUNNING
    assert await boot_id(hv, name) == booted  # restored, not booted
    assert await freeze_status(hv, name) == "thawed"
    assert task["result"]["thawed"][name] >= 1, task["result"]


async def hv_state(hv: LibvirtHypervisor, name: str, state: DomainState) -> bool:
    return (await hv.get_domain(name)).state is state


async def test_a_memory_file_qemu_will_not_load_ends_bounded(
    tmp_path: Path, hv: LibvirtHypervisor, rammed: Domain
) -> None:
    """REVIEW-2 item 5: the memory file passes its checks (magic, size) but
    QEMU will not load it.  Recovery tries a bounded number of times, then
    the domain boots cold on the chain it left and its volumes are free."""
    name = rammed.name
    agent = Agent(tmp_path, config="[agent]\nsweep_interval = 1\n")
    try:
        agent.wait_ready()
        await sh(hv, name, "echo kept > /data/kept; sync")
        task = create_snapshots(agent, {"domains": [name], "memory": True})
        assert task["state"] == "succeeded", task
        (snap,) = task["result"]["snapshots"]
        await asyncio.to_thread(_damage_past_the_header, Path(snap["memory_file"]))
        task = revert(agent, snap["id"], force=True)
        assert task["state"] == "failed", task
        await wait_until(lambda: _settled(agent, hv, name), timeout=120, interval=0.5)
        (before,) = [r for r in agent.client.get(f"/v1/snapshots?domain={name}")["snapshots"]
                     if r["origin"] == "before-revert"]
        vol = (await hv.get_domain(name)).volumes[0]
        assert vol.active_file == before["file"]  # the chain it left
        assert "could not be finished in 3 tries" in agent.output()
        await Lab(hv).wait_for_agent(name, 180)
        assert (await sh(hv, name, "cat /data/kept")).strip() == "kept"
        # Its volumes are free again.
        again = create_snapshots(agent, {"domains": [name]})
        assert again["state"] == "succeeded", again
    finally:
        agent.stop()


def _damage_past_the_header(memory: Path) -> None:
    """Random bytes in the migration stream; magic and size unchanged."""
    size = memory.stat().st_size
    with memory.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(1 << 20, size // 4)))


async def _settled(agent: Agent, hv: LibvirtHypervisor, name: str) -> bool:
    with sqlite3.connect(agent.state_dir / "journal.db") as conn:
        left = int(conn.execute("SELECT count(*) FROM operations").fetchone()[0])
    return left == 0 and (await hv.get_domain(name)).state is DomainState.RUNNING


@pytest.mark.parametrize("point", ["revert:stopping", "revert:overlays", "revert:switching"])
async def test_a_memory_revert_cut_short_is_finished(
    tmp_path: Path, hv: LibvirtHypervisor, rammed: Domain, point: str
) -> None:
    """Once its domain was destroyed, a memory revert is finished after a
    restart, not undone: the guest comes back at the snapshot's instant,
    never booted afresh on a disk cut off mid-write."""
    name, step = rammed.name, point.split(":")[1]
    booted = await boot_id(hv, name)
    first = Agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    try:
        first.wait_ready()
        await sh(hv, name, f"echo {step} > /tmp/cut; sync")
        task = create_snapshots(first, {"domains": [name], "memory": True})
        assert task["state"] == "succeeded", task
        snap = task["result"]["snapshots"][0]
        await sh(hv, name, "rm /tmp/cut")
        first.client.request("POST", f"/v1/snapshots/{snap['id']}/revert", {"force": True})
        assert first.wait_exit(300) == -signal.SIGKILL
    finally:
        first.stop()
    restarted = Agent(tmp_path)
    try:
        restarted.wait_ready(300)
        assert (await hv.get_domain(name)).state is DomainState.RUNNING
        assert await boot_id(hv, name) == booted
        assert (await sh(hv, name, "cat /tmp/cut")).strip() == step
        vol = (await hv.get_domain(name)).volumes[0]
        assert vol.chain[1].path == snap["image"]
        records = restarted.client.get(f"/v1/snapshots?domain={name}")["snapshots"]
        assert {r["status"] for r in records} == {"available"}
    finally:
        restarted.stop()


@pytest.fixture(scope="module")
async def two(lab: Lab) -> AsyncIterator[list[Domain]]:
    doms = list(await asyncio.gather(*(lab.up(f"{PREFIX}memory-{side}", disks=1,
                                              size_mib=32) for side in "xy")))
    yield doms
    for dom in doms:
        await lab.down(dom.name)


async def test_a_group_with_memory_comes_back_at_one_instant(
    agent: Agent, hv: LibvirtHypervisor, two: list[Domain]
) -> None:
    booted = {d.name: await boot_id(hv, d.name) for d in two}
    for dom in two:
        await sh(hv, dom.name, "echo G > /tmp/group")
    task = create_snapshots(agent, {"domains": [d.name for d in two], "memory": True})
    assert task["state"] == "succeeded", task
    snaps = task["result"]["snapshots"]
    assert len({s["memory_file"] for s in snaps}) == 2 and len({s["group_id"] for s in snaps}) == 1
    for dom in two:
        await sh(hv, dom.name, "rm /tmp/group")
    task = revert(agent, snaps[0]["id"], force=True)
    assert task["state"] == "succeeded", task
    assert sorted(task["result"]["domains"]) == sorted(d.name for d in two)
    for dom in two:
        assert await boot_id(hv, dom.name) == booted[dom.name]
        assert (await sh(hv, dom.name, "cat /tmp/group")).strip() == "G"
