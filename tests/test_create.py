"""Snapshot creation against real guests, under the fsync'd write workload."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import (
    Agent,
    Rig,
    chain_of,
    create_snapshots,
    freeze_status,
    gasnap,
    volume_files,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain, DomainState
from gasnap.lab.guests import Lab
from gasnap.lab.verify import fsck_snapshot
from gasnap.lab.workload import freeze_log, sh, start_load, stop_load
from gasnap.virt import LibvirtHypervisor


@pytest.fixture
async def load(rig: Rig) -> AsyncIterator[None]:
    await start_load(rig.hv, rig.guest.name)
    yield
    await stop_load(rig.hv, rig.guest.name)


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout


# --- consistency ----------------------------------------------------------------


async def test_twenty_quiesced_snapshots_have_clean_images(rig: Rig, load: None) -> None:
    agent, hv, guest = rig.agent, rig.hv, rig.guest
    before = int(await sh(hv, guest.name, "wc -l < /data/load/counter"))
    snaps = []
    for i in range(20):
        task = create_snapshots(agent, {"domains": [guest.name], "disks": {guest.name: ["vda"]},
                                        "quiesce": "required", "name": f"q{i}"})
        assert task["state"] == "succeeded", task
        (snap,) = task["result"]["snapshots"]
        assert snap["consistency"] == "filesystem"
        snaps.append(snap)
    after = int(await sh(hv, guest.name, "wc -l < /data/load/counter"))
    assert after > before  # the guest kept writing throughout

    chain = await chain_of(hv, guest.name, "vda")
    for older, newer in itertools.pairwise(snaps):
        assert newer["parent"] == older["id"]
        assert newer["image"] == older["file"]
        assert chain.index(newer["file"]) < chain.index(older["file"])
    base = Path(snaps[0]["image"]).stat()
    for snap in snaps:
        assert Path(snap["file"]).name.count(".") == 1  # Cinder naming: volume-X.snap
        st = Path(snap["file"]).stat()
        assert (st.st_uid, st.st_gid, st.st_mode) == (base.st_uid, base.st_gid, base.st_mode)
        result = await fsck_snapshot(snap)
        assert result.clean, f"{snap['image']}:\n{result.output}"
    header = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", snaps[-1]["file"]],
        check=True, capture_output=True, text=True).stdout)
    assert header["backing-filename"] == Path(snaps[-1]["image"]).name  # relative


async def test_group_of_two_domains(rig: Rig) -> None:
    """One window over two domains (on bare QEMU, two QEMU processes: one
    transaction each, inside the same freeze).  The second guest's freeze
    hook takes a second: the task's window breakdown names it as the one
    that bounded the freeze phase."""
    agent, hv, guest, second = rig.agent, rig.hv, rig.guest, rig.second
    logs = {d: len(await freeze_log(hv, d)) for d in (guest.name, second.name)}
    await sh(hv, second.name, "echo 1 > /run/gasnap-hook-delay")
    try:
        task = create_snapshots(agent, {"domains": [guest.name, second.name],
                                        "quiesce": "required", "name": "group"})
    finally:
        await sh(hv, second.name, "rm -f /run/gasnap-hook-delay")
    assert task["state"] == "succeeded", task
    window = task["result"]["window"]
    assert window["slowest"]["freeze"]["domain"] == second.name, window
    assert window["freeze_ms"] >= window["slowest"]["freeze"]["ms"] >= 1000, window
    for phase in ("switch", "thaw"):
        assert window["slowest"][phase]["domain"] in (guest.name, second.name), window
        assert 0 < window["slowest"][phase]["ms"] <= window[f"{phase}_ms"], window
    snaps = task["result"]["snapshots"]
    assert sorted((s["domain"], s["target"]) for s in snaps) == sorted(
        (d.name, v.target) for d in (guest, second) for v in d.volumes)
    assert len({s["group_id"] for s in snaps}) == 1
    assert snaps[0]["group_id"] is not None
    assert {s["consistency"] for s in snaps} == {"filesystem"}
    for snap in snaps:
        assert (await chain_of(hv, snap["domain"], snap["target"]))[:2] == [
            snap["file"], snap["image"]]
        listed = agent.client.get(f"/v1/snapshots/{snap['id']}")
        assert listed == snap
    for name, count in logs.items():
        assert [e for e, _ in (await freeze_log(hv, name))[count:]] == ["freeze", "thaw"]


async def test_a_disk_subset_through_the_cli(
    agent: Agent, hv: LibvirtHypervisor, second: Domain
) -> None:
    vda_before = await chain_of(hv, second.name, "vda")
    task = json.loads(gasnap("--api", agent.api, "snapshot", "create", second.name,
                             "--disk", "vdb", "--name", "only-vdb", "--json").stdout)
    assert task["state"] == "succeeded"
    (snap,) = task["result"]["snapshots"]
    assert snap["target"] == "vdb"
    assert snap["group_id"] is None
    assert await chain_of(hv, second.name, "vda") == vda_before
    assert (await chain_of(hv, second.name, "vdb"))[0] == snap["file"]


async def test_an_overlay_made_by_hand_between_snapshots(
    agent: Agent, hv: LibvirtHypervisor, second: Domain
) -> None:
    body = {"domains": [second.name], "disks": {second.name: ["vda"]}}
    first = create_snapshots(agent, body)["result"]["snapshots"][0]
    by_hand = first["file"] + ".by-hand"
    virsh("snapshot-create-as", second.name, "--disk-only", "--no-metadata", "--atomic",
          "--diskspec", f"vda,snapshot=external,file={by_hand}", "--diskspec", "vdb,snapshot=no")
    later = create_snapshots(agent, body)
    assert later["state"] == "succeeded", later
    snap = later["result"]["snapshots"][0]
    assert snap["image"] == by_hand  # the truth from the live XML, not a cache
    assert snap["parent"] == first["id"]
    assert (await chain_of(hv, second.name, "vda"))[:3] == [snap["file"], by_hand, first["file"]]


# --- domain states and guest agents ------------------------------------------------


async def test_a_stopped_domain_is_switched_offline(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, second: Domain
) -> None:
    await hv.destroy(second.name)
    try:
        task = create_snapshots(agent, {"domains": [second.name], "quiesce": "required"})
        assert task["state"] == "succeeded", task
        snaps = task["result"]["snapshots"]
        assert {s["consistency"] for s in snaps} == {"crash"}  # nothing was frozen
        inactive = virsh("dumpxml", "--inactive", second.name)
        for snap in snaps:
            assert f"<source file='{snap['file']}'/>" in inactive
    finally:
        await lab.up(second.name)
    for snap in snaps:
        assert (await chain_of(hv, second.name, snap["target"]))[:2] == [
            snap["file"], snap["image"]]
    mounts = await sh(hv, second.name, "grep -c ' /data' /proc/mounts")
    assert mounts.strip() == "2"


async def test_a_paused_domain(agent: Agent, hv: LibvirtHypervisor, second: Domain) -> None:
    virsh("suspend", second.name)
    try:
        chain = await chain_of(hv, second.name, "vda")
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots",
                                 {"domains": [second.name], "quiesce": "required"})
        assert info.value.details["status"] == 409
        assert info.value.code == "domain_state"
        assert await chain_of(hv, second.name, "vda") == chain
        task = create_snapshots(agent, {"domains": [second.name], "quiesce": "preferred"})
        assert task["state"] == "succeeded", task
        assert {s["consistency"] for s in task["result"]["snapshots"]} == {"crash"}
        assert (await hv.get_domain(second.name)).state is DomainState.PAUSED
    finally:
        virsh("resume", second.name)


async def test_no_guest_agent_with_each_policy(
    agent: Agent, hv: LibvirtHypervisor, noagent: Domain
) -> None:
    vda = noagent.volumes[0]
    files = volume_files(vda.active_file)
    records = agent.client.get(f"/v1/snapshots?domain={noagent.name}")["snapshots"]
    with pytest.raises(ApiError) as info:
        agent.client.request("POST", "/v1/snapshots",
                             {"domains": [noagent.name], "quiesce": "required"})
    assert info.value.details["status"] == 409
    assert info.value.code == "guest_agent_absent"
    assert volume_files(vda.active_file) == files
    assert agent.client.get(f"/v1/snapshots?domain={noagent.name}")["snapshots"] == records
    for policy in ("preferred", "off"):
        task = create_snapshots(agent, {"domains": [noagent.name], "quiesce": policy})
        assert task["state"] == "succeeded", task
        (snap,) = task["result"]["snapshots"]
        assert (snap["status"], snap["consistency"]) == ("available", "crash")


@pytest.fixture
def short_agent(tmp_path: Path, rig: Rig) -> Iterator[Agent]:
    """An agent with a 3 s freeze_timeout, on each backend."""
    running = rig.new_agent(tmp_path, freeze_timeout=3)
    running.wait_ready()
    yield running
    running.stop()


@pytest.mark.parametrize("policy", ["required", "preferred"])
async def test_a_guest_agent_that_hangs_mid_freeze(
    short_agent: Agent, rig: Rig, policy: str
) -> None:
    hv, guest = rig.hv, rig.guest
    await sh(hv, guest.name, "echo 8 > /run/gasnap-hook-delay")
    chain = await chain_of(hv, guest.name, "vdb")
    try:
        task = create_snapshots(short_agent, {"domains": [guest.name],
                                              "disks": {guest.name: ["vdb"]},
                                              "quiesce": policy})
        (snap,) = task["result"]["snapshots"]
        if policy == "required":
            assert task["state"] == "failed"
            assert task["error"]["code"] == "quiesce_failed"
            assert snap["status"] == "error"
            assert await chain_of(hv, guest.name, "vdb") == chain
            assert not Path(chain[0] + "." + snap["id"]).exists()
        else:
            assert task["state"] == "succeeded", task
            assert (snap["status"], snap["consistency"]) == ("available", "crash")

        # qemu-ga freezes once its hook returns, long after the request timed
        # out: the agent's thaw or the freeze guard must still undo it.
        async def thawed() -> bool:
            try:
                return await freeze_status(hv, guest.name) == "thawed"
            except Exception:
                return False

        await wait_until(thawed, timeout=40)
    finally:
        async def cleared() -> bool:
            try:
                await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
                return True
            except Exception:
                return False

        await wait_until(cleared, timeout=40)
    log = [e for e, _ in await freeze_log(hv, guest.name)]
    assert log[-1] == "thaw"
