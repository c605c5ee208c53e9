"""What only the bare-QEMU backend (#21) has to prove, against real QEMU and
qemu-ga with no libvirt: what QEMU alone cannot do is refused with 501 and
nothing changes; overlays staged before a freeze that failed are undone; a
name taken over by another QEMU is never acted on; Nova's calls work there
too.  Create, delete, recovery, concurrency and bad input run on both
backends in their own modules (the ``rig`` fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    PREFIX,
    Agent,
    Rig,
    chain_of,
    create_snapshots,
    delete_snapshot,
    freeze_status,
    qemu_open_files,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.errors import NotFound
from gasnap.hypervisor import DomainChanged
from gasnap.images import read_qcow2_header
from gasnap.lab.bare import BareLab
from gasnap.lab.bare import is_running as running
from gasnap.lab.workload import sh
from gasnap.qmp.backend import QmpHypervisor
from gasnap.qmp.monitor import Session
from test_trust import HOST_FILE, guest_written_header, hostile_header


@pytest.fixture(scope="module")
def rig(qmp_rig: Rig) -> Rig:
    return qmp_rig


async def named_nodes(hv: QmpHypervisor, name: str) -> set[str]:
    async with Session(hv.run_dir, name) as qmp:
        return {str(n["node-name"]) for n in
                await qmp.call("query-named-block-nodes", {"flat": True})}


def refused(agent: Agent, method: str, path: str, body: dict[str, Any] | None,
            status: int, code: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        agent.client.request(method, path, body)
    assert (info.value.details["status"], info.value.code) == (status, code), info.value
    return info.value


async def test_what_qemu_alone_cannot_do_is_501_and_changes_nothing(rig: Rig) -> None:
    agent, hv, guest = rig.agent, rig.hv, rig.guest
    snap = create_snapshots(agent, {"domains": [guest.name]})
    assert snap["state"] == "succeeded", snap
    first = snap["result"]["snapshots"][0]
    chains = {v.target: await chain_of(hv, guest.name, v.target) for v in guest.volumes}
    records = agent.client.get(f"/v1/snapshots?domain={guest.name}")["snapshots"]
    err = refused(agent, "POST", "/v1/snapshots", {"domains": [guest.name], "memory": True},
                  501, "not_supported_on_backend")
    assert "RAM" in err.message
    refused(agent, "POST", f"/v1/snapshots/{first['id']}/revert", {"force": True},
            501, "not_supported_on_backend")
    refused(agent, "POST", f"/v1/snapshots/{first['id']}/clone",
            {"mode": "linked", "attach": {"domain": guest.name}}, 501,
            "not_supported_on_backend")
    assert {v.target: await chain_of(hv, guest.name, v.target)
            for v in guest.volumes} == chains
    assert agent.client.get(f"/v1/snapshots?domain={guest.name}")["snapshots"] == records
    assert await freeze_status(hv, guest.name) == "thawed"
    # A clone that nothing attaches is qemu-img's work alone: it works here.
    task = agent.client.request("POST", f"/v1/snapshots/{first['id']}/clone",
                                {"mode": "linked"})["task"]
    done = agent.client.get(f"/v1/tasks/{task['id']}?wait=30")
    assert done["state"] == "succeeded", done


async def test_a_failed_freeze_leaves_no_staged_overlay_open(rig: Rig, tmp_path: Path) -> None:
    """The overlays' nodes are added before the freeze; a freeze that fails
    (qemu-ga's hook hangs past freeze_timeout) removes them again: QEMU
    holds no overlay file open, and the chain is as it was."""
    hv, guest = rig.hv, rig.guest
    nodes = await named_nodes(hv, guest.name)
    chain = await chain_of(hv, guest.name, "vdb")
    agent = rig.new_agent(tmp_path, freeze_timeout=3)
    try:
        agent.wait_ready()
        await sh(hv, guest.name, "echo 8 > /run/gasnap-hook-delay")
        task = create_snapshots(agent, {"domains": [guest.name],
                                        "disks": {guest.name: ["vdb"]},
                                        "quiesce": "required"})
        assert task["state"] == "failed" and task["error"]["code"] == "quiesce_failed", task
        (snap,) = task["result"]["snapshots"]
        assert await chain_of(hv, guest.name, "vdb") == chain
        assert await named_nodes(hv, guest.name) == nodes
        overlay = f"{chain[0]}.{snap['id']}"
        assert overlay not in qemu_open_files(hv, guest.name)
        assert not Path(overlay).exists()
    finally:
        agent.stop()

        async def cleared() -> bool:
            try:
                await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
                return await freeze_status(hv, guest.name) == "thawed"
            except Exception:
                return False

        await wait_until(cleared, timeout=40)


async def test_a_name_taken_over_by_another_qemu_is_never_acted_on(rig: Rig) -> None:
    """A plan holds the UUID it read; the same name answered by a QEMU
    started since (another -uuid) is refused, never switched."""
    assert rig.bare is not None
    hv: QmpHypervisor = rig.hv
    name = f"{PREFIX}q-twin"
    await rig.bare.up(name, disks=1, size_mib=32)
    try:
        planned = (await hv.get_domain(name)).uuid
        await rig.bare.down(name)
        await rig.bare.up(name, disks=1, size_mib=32)
        assert (await hv.get_domain(name)).uuid != planned
        with pytest.raises(DomainChanged):
            async with hv.hold({name: planned}):
                pass
        with pytest.raises(NotFound):
            await hv.get_domain(name, uuid=planned)
    finally:
        await rig.bare.down(name)


async def test_a_qemu_killed_leaves_no_domain(rig: Rig) -> None:
    """SIGKILL leaves NAME.qmp behind with nobody listening: the domain is
    gone (404), not a service outage, and listing the others still works."""
    assert rig.bare is not None
    name = f"{PREFIX}q-killed"
    await rig.bare.up(name, disks=1, size_mib=32)
    pid = rig.bare.pid_of(name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def gone() -> bool:  # exited, its files closed (a zombie at most)
        return not running(pid)

    await wait_until(gone)
    try:
        assert (rig.run_dir or Path()).joinpath(f"{name}.qmp").exists()
        with pytest.raises(NotFound):  # the test's own view too
            await rig.hv.get_domain(name)
        refused(rig.agent, "POST", "/v1/snapshots", {"domains": [name]}, 404,
                "domain_not_found")
        names = [d["name"] for d in rig.agent.client.get("/v1/domains")["domains"]]
        assert name not in names and rig.guest.name in names
    finally:
        await rig.bare.down(name)


async def test_novas_calls_on_bare_qemu(rig: Rig) -> None:
    """os-assisted-volume-snapshots: the caller's new_file becomes the
    active layer (staged like gasnap's own), and Nova's commit deletes it."""
    agent, hv, guest = rig.agent, rig.hv, rig.guest
    vol = (await hv.get_domain(guest.name)).volumes[1]
    before = await chain_of(hv, guest.name, vol.target)
    sid = str(uuid.uuid4())
    new_file = f"{Path(vol.active_file).name.split('.')[0]}.{sid}"
    agent.client.request("POST", "/os-assisted-volume-snapshots", {"snapshot": {
        "volume_id": vol.volume_id,
        "create_info": {"snapshot_id": sid, "type": "qcow2", "new_file": new_file}}})

    async def available() -> bool:
        try:
            return bool(agent.client.get(f"/v1/snapshots/{sid}")["status"] == "available")
        except ApiError:
            return False

    await wait_until(available, timeout=60)
    active = str(Path(vol.active_file).parent / new_file)
    assert await chain_of(hv, guest.name, vol.target) == [active, *before]
    info = json.dumps({"type": "qcow2", "volume_id": vol.volume_id, "file_to_merge": new_file,
                       "merge_target_file": Path(before[0]).name})
    agent.client.request("DELETE", f"/os-assisted-volume-snapshots/{sid}"
                                   f"?delete_info={urllib.parse.quote(info)}")

    async def merged() -> bool:
        return await chain_of(hv, guest.name, vol.target) == before

    await wait_until(merged, timeout=60)
    assert active not in qemu_open_files(hv, guest.name)


async def test_a_raw_disk_whose_bytes_look_like_qcow2_stays_raw(rig: Rig) -> None:
    """REVIEW R1 on bare QEMU: the guest's raw disk starts with a qcow2
    header whose backing file is a host file.  Formats are QEMU's own
    (query-block), never probed: the chain never names the host file, the
    raw layer stays raw, and the merge commits into the chain as it was."""
    agent, hv, raw = rig.agent, rig.hv, rig.raw
    before = (await hv.get_domain(raw.name)).volumes[0]
    disk = before.chain[-1].path
    assert before.chain[-1].format == "raw"
    with guest_written_header(disk):
        task = create_snapshots(agent, {"domains": [raw.name], "quiesce": "required"})
        assert task["state"] == "succeeded", task
        (snap,) = task["result"]["snapshots"]
        assert snap["image"] == before.active_file
        header = read_qcow2_header(snap["file"])
        assert (header.backing_file, header.backing_format) == (
            Path(before.active_file).name, before.format)
        vol = (await hv.get_domain(raw.name)).volumes[0]
        assert [(layer.path, layer.format) for layer in vol.chain] == [
            (snap["file"], "qcow2"), *[(lr.path, lr.format) for lr in before.chain]]
        listed = next(d for d in agent.client.get("/v1/domains")["domains"]
                      if d["name"] == raw.name)
        assert HOST_FILE not in listed["volumes"][0]["chain"]
        done = delete_snapshot(agent, snap["id"], "commit")
        assert done["state"] == "succeeded", done
        assert await chain_of(hv, raw.name, "vda") == [lr.path for lr in before.chain]
        assert Path(disk).read_bytes()[:1024] == hostile_header()  # the guest's bytes


async def test_layers_made_by_hand_are_managed_on_bare_qemu(rig: Rig) -> None:
    """An overlay an operator made with qemu-img and stacked with QMP's
    blockdev-add and blockdev-snapshot is adopted (manage) and then merged
    away like gasnap's own."""
    agent, hv, guest = rig.agent, rig.hv, rig.merge
    vol = (await hv.get_domain(guest.name)).volumes[0]
    below = vol.active_file
    by_hand = str(Path(below).with_name(f"{Path(below).name}.by-hand"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", vol.format, "-b",
                    Path(below).name, by_hand], check=True, cwd=Path(below).parent)
    async with Session(hv.run_dir, guest.name) as qmp:
        root = next(b["inserted"]["node-name"] for b in await qmp.call("query-block")
                    if b["qdev"].endswith("/vda/virtio-backend"))
        await qmp.call("blockdev-add", {"driver": "qcow2", "node-name": "by-hand",
                                        "backing": None,
                                        "file": {"driver": "file", "filename": by_hand}})
        await qmp.call("blockdev-snapshot", {"node": root, "overlay": "by-hand"})
    assert await chain_of(hv, guest.name, "vda") == [by_hand, *[lr.path for lr in vol.chain]]
    managed = agent.client.request("POST", "/v1/snapshots/manage", {
        "volume_id": vol.volume_id, "ref": {"file": Path(by_hand).name}})
    assert (managed["file"], managed["image"]) == (by_hand, below)
    done = delete_snapshot(agent, managed["id"], "commit")
    assert done["state"] == "succeeded", done
    assert await chain_of(hv, guest.name, "vda") == [lr.path for lr in vol.chain]
    assert by_hand not in qemu_open_files(hv, guest.name)


async def test_a_disk_qemu_names_by_a_path_with_dots_is_never_acted_on(
        rig: Rig, tmp_path: Path) -> None:
    """REVIEW-2 item 8: the file names QEMU reports feed overlay names,
    directory checks and unlinks.  A QEMU whose disk is opened by a name
    that needs interpreting (``..``) has that disk refused before anything
    is made next to it."""
    assert rig.run_dir is not None
    (tmp_path / "lab").mkdir()
    lab = BareLab(run_dir=rig.run_dir, lab_dir=tmp_path / "lab" / ".." / "lab")
    name = f"{PREFIX}q-dots"
    await lab.up(name, disks=1, size_mib=16)
    try:
        vol = (await rig.hv.get_domain(name)).volumes[0]
        assert "/../" in vol.active_file and vol.chain_error is not None
        directory = tmp_path / "lab" / name
        before = sorted(directory.iterdir())
        refused(rig.agent, "POST", "/v1/snapshots", {"domains": [name], "quiesce": "off"},
                400, "unsupported_disk")
        assert sorted(directory.iterdir()) == before
        assert await chain_of(rig.hv, name, vol.target) == [vol.active_file]
    finally:
        await lab.down(name)
