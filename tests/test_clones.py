"""Clones on lab guests (raw and qcow2 sources): a snapshot's data read by a
second guest through a linked clone attached read-only, written through one
attached read-write without touching the snapshot, the dependency rule
(delete refused until the clone is flattened), full clones that outlive
their source, bad input, and a clone cut short at every step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    PREFIX,
    URI,
    Agent,
    chain_of,
    create_snapshots,
    delete_snapshot,
    gasnap,
    hv_call,
    image_digest,
    record_digest,
    running_agent,
    snap,
    wait_task,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.errors import GasnapError
from gasnap.hypervisor import Domain, DomainState
from gasnap.images import read_qcow2_header
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.metadata import Consistency, Finalization, NewSnapshot, Status
from gasnap.metastore import open_sqlite
from gasnap.virt import LibvirtHypervisor


@pytest.fixture(scope="module", params=["qcow2", "raw"])
async def source(request: pytest.FixtureRequest, lab: Lab) -> AsyncIterator[Domain]:
    dom = await lab.up(f"{PREFIX}clsrc-{request.param}", disks=1, size_mib=32,
                       disk_format=request.param)
    yield dom
    await lab.down(dom.name)


@pytest.fixture(scope="module")
async def reader(lab: Lab, source: Domain) -> AsyncIterator[Domain]:
    """The second guest the clones are attached to (one per source: gone
    before the source's files are)."""
    dom = await lab.up(f"{source.name}-reader", disks=1, size_mib=32)
    yield dom
    await lab.down(dom.name)


def clone(agent: Agent, snapshot_id: str, **body: Any) -> dict[str, Any]:
    task = agent.client.request("POST", f"/v1/snapshots/{snapshot_id}/clone", body)["task"]
    return wait_task(agent, task["id"], timeout=300)


def files(directory: Path) -> set[Path]:
    """The files of DIRECTORY but the spare overlays the agent makes in the
    background (``gasnap.spares``), which come and go on their own."""
    return {p for p in directory.iterdir() if ".gasnap-spare" not in p.name}


def refused(agent: Agent, method: str, path: str, body: Any, status: int, code: str) -> str:
    with pytest.raises(ApiError) as err:
        agent.client.request(method, path, body)
    assert (err.value.details["status"], err.value.code) == (status, code), err.value
    return str(err.value)


async def device_of(hv: LibvirtHypervisor, name: str, clone_id: str) -> str | None:
    """The guest's name of the disk whose serial is CLONE_ID (the guest names
    disks in the order it finds them, whatever libvirt's target says)."""
    out = await sh(hv, name, "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial); done")
    for line in out.splitlines():
        dev, _, serial = line.partition(" ")
        if serial.strip() == clone_id[:20]:
            return dev
    return None


async def plugged(hv: LibvirtHypervisor, name: str, clone_id: str) -> str:
    """Until the guest sees the disk: its device name."""
    found: list[str] = []

    async def seen() -> bool:
        dev = await device_of(hv, name, clone_id)
        found.extend([dev] if dev else [])
        return dev is not None

    await wait_until(seen, timeout=60)
    return found[-1]


async def write_known(hv: LibvirtHypervisor, name: str, tag: str) -> str:
    """A file of random bytes on the guest's /data; its sha256."""
    out = await sh(hv, name, f"head -c 262144 /dev/urandom > /data/{tag} && sync && "
                             f"sha256sum /data/{tag}")
    return out.split()[0]


async def read_on(hv: LibvirtHypervisor, name: str, dev: str, tag: str, *,
                  readonly: bool) -> str:
    """Mount DEV in guest NAME, the sha256 of /data's file TAG on it, unmounted again."""
    options = "ro,noload" if readonly else "rw"
    out = await sh(hv, name, f"mkdir -p /mnt/c && mount -o {options} /dev/{dev} /mnt/c && "
                             f"sha256sum /mnt/c/{tag}; umount /mnt/c")
    return out.split()[0]


async def test_linked_clone_read_write_flatten_and_the_dependency_rule(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    name, other = source.name, reader.name
    older = snap(agent, source, "below-the-clone")
    known = await write_known(hv, name, "known")
    made = snap(agent, source, "for-clones")
    assert made["image"] == older["file"]
    image_before = record_digest(made)
    fmt = str(read_qcow2_header(made["file"]).backing_format)

    # Read-only: OpenEBS's "mount snapshot".
    task = clone(agent, made["id"], name="ro", attach={"domain": other, "readonly": True})
    assert task["state"] == "succeeded", task
    ro = task["result"]["clone"]
    assert (ro["mode"], ro["status"], ro["source_snapshot"]) == ("linked", "available",
                                                               made["id"])
    assert ro["attached_to"] == {"domain": other, "target": "vdb", "readonly": True}
    assert ro["file"] == os.path.join(os.path.dirname(made["image"]), f"volume-{ro['id']}")
    header = read_qcow2_header(ro["file"])
    assert (header.backing_file, header.backing_format) == (
        os.path.basename(made["image"]), fmt)  # relative pointer, format named
    dev = await plugged(hv, other, ro["id"])
    assert (await sh(hv, other, f"cat /sys/block/{dev}/ro")).strip() == "1"
    assert await read_on(hv, other, dev, "known", readonly=True) == known
    write = await sh(hv, other, f"dd if=/dev/zero of=/dev/{dev} bs=4096 count=1 2>&1; "
                                "echo rc=$?")
    assert "rc=0" not in write  # the guest cannot write it
    listed = json.loads(gasnap("--api", agent.api, "clone", "list", "--snapshot", made["id"],
                               "--json").stdout)
    assert [c["id"] for c in listed] == [ro["id"]]

    # A snapshot a linked clone reads is not deleted, nor merged into.
    chain = await chain_of(hv, name, "vda")
    message = refused(agent, "DELETE", f"/v1/snapshots/{made['id']}", None, 409,
                      "snapshot_has_clones")
    assert ro["id"] in message
    # Nor the one below it: its merge would write into, or remove, the clone's image.
    for strategy in ("commit", "auto"):
        refused(agent, "DELETE", f"/v1/snapshots/{older['id']}?strategy={strategy}", None, 409,
                "snapshot_has_clones")
    assert await chain_of(hv, name, "vda") == chain
    assert agent.client.get(f"/v1/snapshots/{made['id']}")["status"] == "available"
    refused(agent, "DELETE", f"/v1/clones/{ro['id']}", None, 409, "clone_attached")
    # Read-only in a running guest: neither a job nor qemu-img may write it.
    refused(agent, "POST", f"/v1/clones/{ro['id']}/flatten", {}, 409, "clone_attached")

    detached = json.loads(gasnap("--api", agent.api, "clone", "detach", ro["id"],
                                 "--json").stdout)
    assert detached["attached_to"] is None
    assert await device_of(hv, other, ro["id"]) is None
    task = wait_task(agent, agent.client.request("DELETE", f"/v1/clones/{ro['id']}")
                     ["task"]["id"])
    assert task["state"] == "succeeded", task
    assert not os.path.exists(ro["file"])
    refused(agent, "GET", f"/v1/clones/{ro['id']}", None, 404, "clone_not_found")

    # Read-write: written by the second guest, the snapshot stays as it was.
    task = clone(agent, made["id"], name="rw")
    assert task["state"] == "succeeded", task
    rw = task["result"]["clone"]
    assert rw["attached_to"] is None
    attached = json.loads(gasnap("--api", agent.api, "clone", "attach", rw["id"], other,
                                 "--target", "vdc", "--json").stdout)
    assert attached["attached_to"] == {"domain": other, "target": "vdc", "readonly": False}
    dev = await plugged(hv, other, rw["id"])
    await sh(hv, other, f"mkdir -p /mnt/c && mount /dev/{dev} /mnt/c && "
                        "echo written > /mnt/c/by-reader && sync && umount /mnt/c")
    assert record_digest(made) == image_before
    assert (await sh(hv, name, "sha256sum /data/known")).split()[0] == known

    # Flatten (live: a pull in the reader), then the snapshot can go.
    refused(agent, "DELETE", f"/v1/snapshots/{made['id']}", None, 409, "snapshot_has_clones")
    task = wait_task(agent, agent.client.request("POST", f"/v1/clones/{rw['id']}/flatten",
                                                 {})["task"]["id"], timeout=300)
    assert task["state"] == "succeeded", task
    assert task["result"]["clone"]["mode"] == "full"
    assert read_qcow2_header(rw["file"]).backing_file is None
    for gone in (made, older):
        task = delete_snapshot(agent, gone["id"])
        assert task["state"] == "succeeded", task
    assert await read_on(hv, other, dev, "known", readonly=False) == known
    assert (await sh(hv, other, f"mount /dev/{dev} /mnt/c && cat /mnt/c/by-reader; "
                                "umount /mnt/c")).strip() == "written"
    agent.client.request("POST", f"/v1/clones/{rw['id']}/detach", {})
    task = wait_task(agent, agent.client.request("DELETE", f"/v1/clones/{rw['id']}")
                     ["task"]["id"])
    assert task["state"] == "succeeded", task
    assert agent.client.get("/v1/clones")["clones"] == []


async def test_full_clone_outlives_its_source(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    name, other = source.name, reader.name
    known = await write_known(hv, name, "full")
    made = snap(agent, source, "for-a-full-clone")
    proc = gasnap("--api", agent.api, "snapshot", "clone", made["id"], "--full",
                  "--name", "copy", "--json")
    task = json.loads(proc.stdout)
    assert task["state"] == "succeeded", task
    full = task["result"]["clone"]
    assert (full["mode"], full["name"], full["size"]) == ("full", "copy", 32 << 20)
    assert read_qcow2_header(full["file"]).backing_file is None
    assert image_digest(full["file"], "qcow2") == record_digest(made)
    task = delete_snapshot(agent, made["id"])  # a full clone holds nothing
    assert task["state"] == "succeeded", task
    gasnap("--api", agent.api, "clone", "attach", full["id"], other, "--readonly")
    dev = await plugged(hv, other, full["id"])
    assert await read_on(hv, other, dev, "full", readonly=True) == known
    gasnap("--api", agent.api, "clone", "detach", full["id"])
    gasnap("--api", agent.api, "clone", "delete", full["id"])
    assert not os.path.exists(full["file"])


async def test_a_clone_of_a_clones_snapshot_obeys_the_same_rules(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    """A clone attached to the reader is a volume there: it is snapshotted
    with the reader's own disk, cloned again, and each link holds."""
    made = snap(agent, source, "grandparent")
    first = clone(agent, made["id"], attach={"domain": reader.name})["result"]["clone"]
    of_reader = create_snapshots(agent, {"domains": [reader.name]})
    assert of_reader["state"] == "succeeded", of_reader
    on_clone = next(s for s in of_reader["result"]["snapshots"] if s["volume_id"] == first["id"])
    second = clone(agent, on_clone["id"])
    assert second["state"] == "succeeded", second
    second_clone = second["result"]["clone"]
    assert second_clone["source_volume_id"] == first["id"]
    refused(agent, "DELETE", f"/v1/snapshots/{on_clone['id']}", None, 409,
            "snapshot_has_clones")
    refused(agent, "POST", f"/v1/clones/{first['id']}/flatten", {}, 409, "clone_has_snapshots")
    # Its snapshots are merged through the reader: they go before it leaves.
    refused(agent, "POST", f"/v1/clones/{first['id']}/detach", {}, 409, "clone_has_snapshots")
    assert wait_task(agent, agent.client.request(
        "DELETE", f"/v1/clones/{second_clone['id']}")["task"]["id"])["state"] == "succeeded"
    for record in of_reader["result"]["snapshots"]:
        assert delete_snapshot(agent, record["id"])["state"] == "succeeded"
    assert await chain_of(hv, reader.name, "vdb") == [first["file"], made["image"],
                                                      *(await chain_of(hv, source.name,
                                                                       "vda"))[2:]]
    agent.client.request("POST", f"/v1/clones/{first['id']}/detach", {})
    assert wait_task(agent, agent.client.request(
        "DELETE", f"/v1/clones/{first['id']}")["task"]["id"])["state"] == "succeeded"
    assert delete_snapshot(agent, made["id"])["state"] == "succeeded"
    assert not [p for p in Path(first["file"]).parent.iterdir() if first["id"] in p.name]


@pytest.mark.parametrize("source", ["raw"], indirect=True)
async def test_offline_flatten_and_attach_to_a_stopped_domain(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, source: Domain, reader: Domain
) -> None:
    """A clone no QEMU has open is flattened by qemu-img; a stopped domain
    gets it in its definition and sees it when it boots."""
    known = await write_known(hv, source.name, "offline")
    made = snap(agent, source, "offline")
    linked = clone(agent, made["id"])["result"]["clone"]
    task = wait_task(agent, agent.client.request("POST", f"/v1/clones/{linked['id']}/flatten",
                                                 {})["task"]["id"])
    assert task["state"] == "succeeded", task
    assert task["result"]["clone"]["mode"] == "full"
    assert read_qcow2_header(linked["file"]).backing_file is None
    assert image_digest(linked["file"], "qcow2") == record_digest(made)
    assert delete_snapshot(agent, made["id"])["state"] == "succeeded"

    await hv.destroy(reader.name)
    try:
        attached = agent.client.request("POST", f"/v1/clones/{linked['id']}/attach",
                                        {"domain": reader.name, "readonly": True})["clone"]
        assert attached["attached_to"]["domain"] == reader.name
        assert (await hv.get_domain(reader.name)).state is DomainState.SHUTOFF
    finally:
        await hv.start(reader.name)
        await lab.wait_for_agent(reader.name, timeout=180)
    dev = await plugged(hv, reader.name, linked["id"])
    assert await read_on(hv, reader.name, dev, "offline", readonly=True) == known
    agent.client.request("POST", f"/v1/clones/{linked['id']}/detach", {})
    assert await device_of(hv, reader.name, linked["id"]) is None
    assert linked["id"] not in await hv.domain_xml(reader.name, inactive=True)
    gasnap("--api", agent.api, "clone", "delete", linked["id"])


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
async def test_a_detach_follows_a_domain_renamed_since(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, source: Domain, reader: Domain
) -> None:
    """The record names the domain as it was called at attach time; renamed
    since, the domain is found by the clone's serial on its disk and the
    disk really leaves it (before, the record said detached while the
    renamed domain still had it)."""
    made = snap(agent, source, "renamed")
    linked = clone(agent, made["id"])["result"]["clone"]
    renamed = f"{reader.name}-renamed"
    await hv.destroy(reader.name)
    try:
        agent.client.request("POST", f"/v1/clones/{linked['id']}/attach",
                             {"domain": reader.name, "readonly": True})
        subprocess.run(["virsh", "-q", "-c", URI, "domrename", reader.name, renamed],
                       check=True, capture_output=True)
        try:
            detached = agent.client.request("POST", f"/v1/clones/{linked['id']}/detach",
                                            {})["clone"]
            assert detached["attached_to"] is None
            assert linked["id"] not in await hv.domain_xml(renamed, inactive=True)
        finally:
            subprocess.run(["virsh", "-q", "-c", URI, "domrename", renamed, reader.name],
                           check=True, capture_output=True)
    finally:
        await hv.start(reader.name)
        await lab.wait_for_agent(reader.name, timeout=180)
    gasnap("--api", agent.api, "clone", "delete", linked["id"])
    assert delete_snapshot(agent, made["id"])["state"] == "succeeded"


async def test_a_child_made_outside_gasnap_holds_its_snapshot_too(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    """An overlay of a snapshot's image made by hand (no clone record) and
    attached to another guest needs that image as a linked clone would: the
    delete is refused, nothing changed, until it is detached."""
    record = snap(agent, source, "hand-child")
    fmt = str(read_qcow2_header(record["file"]).backing_format)
    child = Path(record["image"]).with_name(f"hand-child-{record['id']}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                    os.path.basename(record["image"]), "-F", fmt, str(child)], check=True)
    virsh = ["virsh", "-q", "-c", URI]
    subprocess.run([*virsh, "attach-disk", reader.name, str(child), "vdy", "--driver", "qemu",
                    "--subdriver", "qcow2", "--mode", "readonly", "--live"], check=True)
    try:
        chain = await chain_of(hv, source.name, "vda")
        for strategy in ("auto", "commit", "pull"):
            message = refused(agent, "DELETE",
                              f"/v1/snapshots/{record['id']}?strategy={strategy}", None, 409,
                              "snapshot_has_clones")
            assert record["image"] in message
        assert await chain_of(hv, source.name, "vda") == chain
        assert agent.client.get(f"/v1/snapshots/{record['id']}")["status"] == "available"
    finally:
        subprocess.run([*virsh, "detach-disk", reader.name, "vdy", "--live"], check=True)
    await wait_until(lambda: _detached(hv, reader.name, str(child)))
    assert delete_snapshot(agent, record["id"])["state"] == "succeeded"
    child.unlink()


async def _detached(hv: LibvirtHypervisor, name: str, path: str) -> bool:
    return all(path not in [layer.path for layer in vol.chain]
               for vol in (await hv.get_domain(name)).volumes)


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
async def test_a_plug_or_unplug_waits_for_a_create_window(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    """A clone plugged into (or unplugged from) a guest that a create holds
    frozen would change its disks inside the window: both wait for the
    window to close.  The create takes the reader with the source, whose
    freeze hook sleeps 3 s: the reader stays frozen meanwhile, and an attach
    or detach that did not wait would land then (libvirt itself only keeps
    it off while the reader's own freeze call runs)."""
    made = snap(agent, source, "window-race")
    linked = clone(agent, made["id"])["result"]["clone"]
    disks = {name: [(await hv.get_domain(name)).volumes[0].target]
             for name in (reader.name, source.name)}
    body = {"domains": list(disks), "disks": disks}
    taken: list[str] = []  # deleted again: other agents' tests take the source's files next
    try:
        for action, extra in (("attach", {"domain": reader.name}), ("detach", {})):
            was = await _has_disk(hv, reader.name, linked["id"])
            await sh(hv, source.name, "echo 3 > /run/gasnap-hook-delay")
            try:
                task = agent.client.request("POST", "/v1/snapshots", body)["task"]
                await wait_until(lambda: _freezing(agent), timeout=30)
                change = asyncio.create_task(asyncio.to_thread(
                    agent.client.request, "POST", f"/v1/clones/{linked['id']}/{action}", extra))
                frozen_seen, deadline = 0, time.monotonic() + 60
                while True:
                    assert time.monotonic() < deadline, "the create never froze and thawed"
                    status = (await hv.agent.fsfreeze_status(reader.name, 30)).value
                    plugged = await _has_disk(hv, reader.name, linked["id"])
                    if status != "frozen" and frozen_seen:
                        break
                    if status == "frozen":
                        frozen_seen += 1
                        assert plugged == was, f"{action} ran inside the create's window"
                        assert not change.done()
                    await asyncio.sleep(0.05)
                assert frozen_seen
                changed = (await change)["clone"]
                done = await asyncio.to_thread(wait_task, agent, task["id"])
            finally:
                await sh(hv, source.name, "rm -f /run/gasnap-hook-delay")
            assert done["state"] == "succeeded", done
            taken.extend(t["id"] for t in done["result"]["snapshots"])
            assert [t["consistency"] for t in done["result"]["snapshots"]] == ["filesystem"] * 2
            assert (changed["attached_to"] is not None) == (action == "attach")
            assert await _has_disk(hv, reader.name, linked["id"]) == (action == "attach")
    finally:
        if await _has_disk(hv, reader.name, linked["id"]):
            agent.client.request("POST", f"/v1/clones/{linked['id']}/detach", {})
        agent.client.request("DELETE", f"/v1/clones/{linked['id']}")
        for snapshot_id in [*reversed(taken), made["id"]]:
            assert delete_snapshot(agent, snapshot_id)["state"] == "succeeded"


async def _has_disk(hv: LibvirtHypervisor, name: str, volume_id: str) -> bool:
    return (await hv.get_domain(name)).volume(volume_id) is not None


async def _freezing(agent: Agent) -> bool:
    """A create stands in its window: the journal says it is freezing."""
    def read() -> bool:
        with sqlite3.connect(agent.state_dir / "journal.db") as conn:
            return conn.execute("SELECT 1 FROM operations WHERE kind = 'create' "
                                "AND step = 'freezing'").fetchone() is not None
    return await asyncio.to_thread(read)


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
async def test_a_guest_that_holds_on_keeps_its_clone(
    tmp_path: Path, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    """A detach the guest does not answer (paused) ends after
    ``detach_timeout`` with 409 detach_timeout, the clone still attached
    everywhere; once the guest lets go, detach again finishes."""
    config = "[agent]\ndetach_timeout = 2\n"
    with running_agent(tmp_path, config=config) as agent:
        made = snap(agent, source, "held")
        held = clone(agent, made["id"], attach={"domain": reader.name})["result"]["clone"]
        await plugged(hv, reader.name, held["id"])
        await hv_call(hv, reader.name, "suspend")
        try:
            refused(agent, "POST", f"/v1/clones/{held['id']}/detach", {}, 409,
                    "detach_timeout")
            assert agent.client.get(f"/v1/clones/{held['id']}")["attached_to"] is not None
            assert held["id"] in await hv.domain_xml(reader.name, inactive=True)
        finally:
            await hv_call(hv, reader.name, "resume")
        await wait_until(lambda: _gone_live(hv, reader.name, held["id"]), timeout=60)
        agent.client.request("POST", f"/v1/clones/{held['id']}/detach", {})
        assert held["id"] not in await hv.domain_xml(reader.name, inactive=True)
        assert agent.client.get(f"/v1/clones/{held['id']}")["attached_to"] is None
        assert wait_task(agent, agent.client.request(
            "DELETE", f"/v1/clones/{held['id']}")["task"]["id"])["state"] == "succeeded"
        assert delete_snapshot(agent, made["id"])["state"] == "succeeded"


async def _gone_live(hv: LibvirtHypervisor, name: str, clone_id: str) -> bool:
    return clone_id not in await hv.domain_xml(name)


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
async def test_retention_keeps_what_a_linked_clone_holds(
    tmp_path: Path, source: Domain
) -> None:
    """A schedule's retention passes over a snapshot a linked clone reads
    (kept, and the run succeeds) and deletes it once the clone is flattened."""
    config = f'[schedules.nightly]\ndomains = ["{source.name}"]\nkeep = 1\n'
    with running_agent(tmp_path, config=config) as agent:
        def nightly() -> dict[str, Any]:
            task = json.loads(gasnap("--api", agent.api, "schedule", "run", "nightly",
                                     "--json").stdout)
            assert task["state"] == "succeeded", task
            return task

        (held,) = nightly()["result"]["snapshots"]
        linked = clone(agent, held["id"])["result"]["clone"]
        assert nightly()["result"]["deleted"] == []
        assert agent.client.get(f"/v1/snapshots/{held['id']}")["status"] == "available"
        task = wait_task(agent, agent.client.request(
            "POST", f"/v1/clones/{linked['id']}/flatten", {})["task"]["id"])
        assert task["state"] == "succeeded", task
        third = nightly()["result"]
        assert held["id"] in third["deleted"]
        gasnap("--api", agent.api, "clone", "delete", linked["id"])
        for record in third["snapshots"]:
            assert delete_snapshot(agent, record["id"])["state"] == "succeeded"


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
async def test_bad_clone_requests_change_nothing(
    agent: Agent, hv: LibvirtHypervisor, source: Domain, reader: Domain
) -> None:
    made = snap(agent, source, "bad-clone-input")
    directory = Path(made["image"]).parent
    before = files(directory)
    path = f"/v1/snapshots/{made['id']}/clone"
    refused(agent, "POST", "/v1/snapshots/no-such-id/clone", {}, 404, "snapshot_not_found")
    refused(agent, "POST", path, {"mode": "deep"}, 400, "invalid_request")
    refused(agent, "POST", path, {"later": 1}, 400, "invalid_request")
    refused(agent, "POST", path, {"attach": {"domain": f"{PREFIX}no-such"}}, 404,
            "domain_not_found")
    refused(agent, "POST", path, {"attach": {"domain": reader.name, "target": "sda"}}, 400,
            "invalid_target")
    refused(agent, "POST", path, {"attach": {"domain": reader.name, "target": "vda"}}, 409,
            "target_busy")
    refused(agent, "GET", "/v1/clones/no-such-clone", None, 404, "clone_not_found")
    for action in ("attach", "detach", "flatten"):
        refused(agent, "POST", f"/v1/clones/no-such-clone/{action}",
                {"domain": reader.name} if action == "attach" else {}, 404, "clone_not_found")
    # A snapshot that is not available.
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.create_snapshot_metadata(NewSnapshot(
        "creating-1", "vol-x", "n", "", 1, "2026-01-01T00:00:00Z", source.name, target="vda"))
    await store.close()
    refused(agent, "POST", "/v1/snapshots/creating-1/clone", {}, 409, "wrong_status")
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.finalize_snapshot_metadata("creating-1", Finalization(
        Status.ERROR, None, None, Consistency.CRASH, "test record"))
    await store.close()
    assert files(directory) == before
    assert agent.client.get(f"/v1/clones?snapshot_id={made['id']}")["clones"] == []
    assert [v.volume_id for v in (await hv.get_domain(reader.name)).volumes] == [
        v.volume_id for v in reader.volumes]
    assert delete_snapshot(agent, made["id"])["state"] == "succeeded"


# --- crash safety -------------------------------------------------------------------

POINTS = ["clone:recording", "clone:making", "clone:made", "clone:attaching",
          "clone:finalizing"]


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
@pytest.mark.parametrize("point", POINTS)
async def test_a_clone_cut_short_anywhere_converges(
    tmp_path: Path, hv: LibvirtHypervisor, source: Domain, reader: Domain, point: str
) -> None:
    """Killed at each step and restarted: no record stays creating, no
    half-made file stays, and the clone is either whole (available, attached
    as the reader's XML shows) or gone (error, no file)."""
    first = Agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    try:
        first.wait_ready()
        made = snap(first, source, f"cut-{point}")
        directory = Path(made["image"]).parent
        before = files(directory)
        first.client.request("POST", f"/v1/snapshots/{made['id']}/clone",
                             {"attach": {"domain": reader.name}})
        assert first.wait_exit(120) == -signal.SIGKILL
    finally:
        first.stop()
    restarted = Agent(tmp_path)
    try:
        restarted.wait_ready(120)
        (record,) = restarted.client.get("/v1/clones")["clones"] or [None]
        added = files(directory) - before
        if point == "clone:recording":  # killed before the record was written
            assert record is None and not added
            return
        assert record is not None
        assert not any(p.name.endswith(".part") for p in added)
        if point in ("clone:making", "clone:made"):
            assert (record["status"], added) == ("error", set())
        else:
            assert record["status"] == "available"
            assert added == {Path(record["file"])}
            targets = (await hv.get_domain(reader.name)).volumes
            shown = next((v.target for v in targets if v.volume_id == record["id"]), None)
            assert (record["attached_to"] or {}).get("target") == shown
            if shown:
                restarted.client.request("POST", f"/v1/clones/{record['id']}/detach", {})
        assert wait_task(restarted, restarted.client.request(
            "DELETE", f"/v1/clones/{record['id']}")["task"]["id"])["state"] == "succeeded"
        assert files(directory) == before
        assert delete_snapshot(restarted, made["id"])["state"] == "succeeded"
    finally:
        restarted.stop()


WORK_POINTS = ["clone:detaching", "clone:flattening", "clone:pulling", "clone:deleted-status"]


@pytest.mark.parametrize("source", ["qcow2"], indirect=True)
@pytest.mark.parametrize("point", WORK_POINTS)
async def test_clone_work_cut_short_converges(
    tmp_path: Path, hv: LibvirtHypervisor, source: Domain, reader: Domain, point: str
) -> None:
    """Detach, flatten (before and during its block job) and delete, each
    killed and restarted: the record says what the domain XML and the file
    say, and doing it again finishes it."""
    first = Agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    try:
        first.wait_ready()
        made = snap(first, source, f"work-{point}")
        cid = clone(first, made["id"], attach={"domain": reader.name})["result"]["clone"]["id"]
        await plugged(hv, reader.name, cid)
        if point == "clone:deleted-status":
            first.client.request("POST", f"/v1/clones/{cid}/detach", {})
            first.client.request("DELETE", f"/v1/clones/{cid}")
        elif point == "clone:detaching":
            with pytest.raises((OSError, GasnapError)):  # the agent dies before it answers
                first.client.request("POST", f"/v1/clones/{cid}/detach", {})
        else:
            first.client.request("POST", f"/v1/clones/{cid}/flatten", {})
        assert first.wait_exit(120) == -signal.SIGKILL
    finally:
        first.stop()
    with running_agent(tmp_path) as agent:
        clones = agent.client.get("/v1/clones")["clones"]
        if point == "clone:deleted-status":
            assert clones == []
            assert not [p for p in files(Path(made["image"]).parent) if cid in p.name]
        else:
            (record,) = clones
            assert record["status"] == "available"
            shown = next((v.target for v in (await hv.get_domain(reader.name)).volumes
                          if v.volume_id == cid), None)
            assert (record["attached_to"] or {}).get("target") == shown
            if point != "clone:detaching":
                task = wait_task(agent, agent.client.request(
                    "POST", f"/v1/clones/{cid}/flatten", {})["task"]["id"], timeout=300)
                assert task["state"] == "succeeded", task
                assert read_qcow2_header(record["file"]).backing_file is None
            agent.client.request("POST", f"/v1/clones/{cid}/detach", {})
            assert wait_task(agent, agent.client.request(
                "DELETE", f"/v1/clones/{cid}")["task"]["id"])["state"] == "succeeded"
        assert await device_of(hv, reader.name, cid) is None
        assert delete_snapshot(agent, made["id"])["state"] == "succeeded"
