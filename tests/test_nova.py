"""Nova's os-assisted-volume-snapshots, driven by the real python-novaclient
the way Cinder's remotefs drivers drive it (keystoneauth1 session, token)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from keystoneauth1 import session as ks_session
from keystoneauth1.token_endpoint import Token
from novaclient import client as nova_client
from novaclient import exceptions as nova_exc

from conftest import PREFIX, Agent, chain_of, running_agent, volume_files
from gasnap.client import ApiError
from gasnap.hypervisor import Domain, Volume
from gasnap.images import overlay_path
from gasnap.images import spare_path as spare_of
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor

TOKEN = "n0va-token"


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with running_agent(tmp_path_factory.mktemp("nova-agent"), tcp_token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def nova(tcp_agent: Agent) -> Any:
    sess = ks_session.Session(auth=Token(tcp_agent.api, TOKEN))
    return nova_client.Client("2.1", session=sess)


async def volume(hv: LibvirtHypervisor, guest: Domain) -> Volume:
    vol = (await hv.get_domain(guest.name)).volumes[1]
    return vol


def settled(agent: Agent, snapshot_id: str, *, gone: bool = False, timeout: float = 120
            ) -> dict[str, Any] | None:
    """The record once the work behind a Nova call is over; GONE: wait for a
    delete to remove it (None).  Nova's calls answer before the work starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record: dict[str, Any] = agent.client.get(f"/v1/snapshots/{snapshot_id}")
        except ApiError as err:
            if err.details["status"] != 404:
                raise
            if gone:
                return None
        else:
            if record["status"] in ("error", "error_deleting") or (
                    record["status"] == "available" and not gone):
                return record
        time.sleep(0.2)
    raise AssertionError(f"snapshot {snapshot_id} did not settle")


def nova_create(nova: Any, vol: Volume, new_file: str, snapshot_id: str | None = None
                ) -> tuple[str, Any]:
    sid = snapshot_id or str(uuid.uuid4())
    answer = nova.assisted_volume_snapshots.create(
        vol.volume_id, {"snapshot_id": sid, "type": "qcow2", "new_file": new_file})
    return sid, answer


def backing_of(path: str) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json",
                                       path],
                                     check=True, capture_output=True, text=True).stdout)
    backing: str | None = info.get("backing-filename")
    return backing


async def test_create_makes_or_reuses_new_file(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    vol = await volume(hv, guest)
    before = await chain_of(hv, guest.name, vol.target)
    new_file = f"{Path(vol.active_file).name.split('.')[0]}.{uuid.uuid4()}"
    sid, answer = nova_create(nova, vol, new_file)
    assert (answer.id, answer.volumeId) == (sid, vol.volume_id)
    record = settled(tcp_agent, sid)
    assert record is not None and record["status"] == "available", record
    active = str(Path(vol.active_file).parent / new_file)
    assert await chain_of(hv, guest.name, vol.target) == [active, *before]
    assert record["file"] == active and record["image"] == before[0]
    assert backing_of(active) == Path(before[0]).name  # relative, as Cinder expects
    # Cinder's way: it makes new_file on top of the active file, then calls.
    reused = f"{Path(active).name.split('.')[0]}.{uuid.uuid4()}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    Path(active).name, str(Path(active).parent / reused)],
                   check=True, cwd=Path(active).parent)
    inode = os.stat(Path(active).parent / reused).st_ino
    sid2, _ = nova_create(nova, vol, reused)
    record2 = settled(tcp_agent, sid2)
    assert record2 is not None and record2["status"] == "available", record2
    assert os.stat(record2["file"]).st_ino == inode  # used as it was, not recreated


async def test_no_spare_next_to_a_volume_whose_overlays_cinder_makes(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """Cinder names new_file as gasnap would (volume-<vol>.<snap>) and makes it
    itself: gasnap leaves nothing of its own in Cinder's share."""
    vol = await volume(hv, guest)
    spare = Path(spare_of(vol.active_file))
    spare.unlink(missing_ok=True)
    sid = str(uuid.uuid4())
    new_file = Path(overlay_path(vol.active_file, vol.volume_id, sid))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", vol.format, "-b",
                    Path(vol.active_file).name, str(new_file)], check=True)
    nova_create(nova, vol, new_file.name, sid)
    record = settled(tcp_agent, sid)
    assert record is not None and record["status"] == "available", record
    assert record["file"] == str(new_file)
    assert (await chain_of(hv, guest.name, vol.target))[0] == str(new_file)
    # A spare is started before the create's task ends: once the task has
    # ended and nothing is being made, none was.
    def ended() -> bool:
        return any(sid in [s["id"] for s in (t.get("result") or {}).get("snapshots", [])]
                   for t in tcp_agent.client.get("/v1/tasks")["tasks"])

    deadline = time.monotonic() + 30
    while not ended() or "gasnap_spares_pending 0.0" not in tcp_agent.client.text("/metrics"):
        assert time.monotonic() < deadline, "spares still being made"
        await asyncio.sleep(0.05)
    assert not spare.exists()


@pytest.mark.parametrize("new_file", ["../escape.qcow2", "/tmp/elsewhere.qcow2",
                                      "sub/dir.qcow2", "..", "."])
async def test_new_file_outside_the_volume_dir_is_refused(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain, new_file: str
) -> None:
    vol = await volume(hv, guest)
    chain, files = await chain_of(hv, guest.name, vol.target), volume_files(vol.active_file)
    with pytest.raises(nova_exc.BadRequest):
        nova_create(nova, vol, new_file)
    assert await chain_of(hv, guest.name, vol.target) == chain
    assert volume_files(vol.active_file) == files
    assert not Path("/tmp/elsewhere.qcow2").exists()


@pytest.mark.parametrize("pointer", ["backing", "data-file", "wrong-backing", "wrong-format"])
async def test_existing_new_file_pointing_elsewhere_is_refused(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain, tmp_path: Path,
    pointer: str
) -> None:
    vol = await volume(hv, guest)
    directory = Path(vol.active_file).parent
    outside = tmp_path / "outside.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "1M"], check=True)
    name = f"{Path(vol.active_file).name.split('.')[0]}.{uuid.uuid4()}"
    target = directory / name
    if pointer == "backing":
        args = ["-F", "qcow2", "-b", str(outside)]
    elif pointer == "data-file":
        args = ["-o", f"data_file={tmp_path / 'data.raw'}"]
    elif pointer == "wrong-backing":  # inside the directory, but not the active file
        chain = await chain_of(hv, guest.name, vol.target)
        args = ["-F", "qcow2", "-b", Path(chain[-1]).name]
    else:  # the active file, but as raw: its qcow2 internals would reach the guest
        args = ["-u", "-F", "raw", "-b", Path(vol.active_file).name]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(target), "128M"],
                   check=True, cwd=directory)
    try:
        chain = await chain_of(hv, guest.name, vol.target)
        with pytest.raises(nova_exc.BadRequest) as refused:
            nova_create(nova, vol, name)
        assert refused.value.code == 400
        assert await chain_of(hv, guest.name, vol.target) == chain
        assert target.exists()  # the caller's file is left alone
    finally:
        target.unlink()


def test_unknown_volume_and_malformed_calls(tcp_agent: Agent, nova: Any) -> None:
    with pytest.raises(nova_exc.NotFound):
        nova.assisted_volume_snapshots.create(
            str(uuid.uuid4()), {"snapshot_id": str(uuid.uuid4()), "type": "qcow2",
                                "new_file": "x"})
    with pytest.raises(nova_exc.NotFound):
        nova.assisted_volume_snapshots.delete(
            str(uuid.uuid4()), {"volume_id": str(uuid.uuid4()), "type": "qcow2",
                                "file_to_merge": None, "merge_target_file": None})
    url = f"{tcp_agent.api}/os-assisted-volume-snapshots"
    headers = {"X-Auth-Token": TOKEN}
    for body in ("not json", "[]", '{"snapshot": {}}',
                 '{"snapshot": {"volume_id": "v", "create_info": {"type": "raw"}}}'):
        answer = requests.post(url, data=body, headers=headers, timeout=10)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["code"] in ("invalid_json", "invalid_request")
    for query in ("", "?delete_info=not-json", "?delete_info=%7B%7D",
                  '?delete_info={"volume_id":"v"}'):
        answer = requests.delete(f"{url}/some-id{query}", headers=headers, timeout=10)
        assert answer.status_code == 400, query
    assert requests.post(url, json={}, timeout=10).status_code == 401


async def test_delete_by_commit_and_by_pull(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """Cinder's two deletes: an inner snapshot commits its overlay into its
    image; the newest one pulls its image into the active layer."""
    vol = await volume(hv, guest)
    base = Path(vol.active_file).name.split(".")[0]
    first, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
    a = settled(tcp_agent, first)
    second, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
    b = settled(tcp_agent, second)
    assert a is not None and b is not None
    chain = await chain_of(hv, guest.name, vol.target)
    assert chain[:3] == [b["file"], a["file"], a["image"]]

    # A mismatching delete_info is refused and changes nothing.
    with pytest.raises(nova_exc.BadRequest):
        nova.assisted_volume_snapshots.delete(first, {
            "volume_id": vol.volume_id, "type": "qcow2",
            "file_to_merge": Path(a["image"]).name, "merge_target_file": Path(a["file"]).name})
    assert await chain_of(hv, guest.name, vol.target) == chain

    # Commit: first's overlay into its image (Cinder's file_to_merge/merge_target_file).
    nova.assisted_volume_snapshots.delete(first, {
        "volume_id": vol.volume_id, "type": "qcow2",
        "file_to_merge": Path(a["file"]).name, "merge_target_file": Path(a["image"]).name})
    assert settled(tcp_agent, first, gone=True) is None
    assert await chain_of(hv, guest.name, vol.target) == [b["file"], *chain[2:]]
    moved = settled(tcp_agent, second)
    assert moved is not None and moved["image"] == a["image"]
    assert not Path(a["file"]).exists()

    # Pull: the newest snapshot's image into the active layer, down to the file below.
    below = chain[3] if len(chain) > 3 else None
    nova.assisted_volume_snapshots.delete(second, {
        "volume_id": vol.volume_id, "type": "qcow2",
        "file_to_merge": Path(below).name if below else None, "merge_target_file": None})
    assert settled(tcp_agent, second, gone=True) is None
    assert await chain_of(hv, guest.name, vol.target) == [b["file"], *chain[3:]]
    assert not Path(a["image"]).exists()


async def test_calls_on_a_busy_volume_wait_for_it(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """Nova accepts work on a busy instance and does it when it can: a Nova
    delete and a Nova create, sent while a create of gasnap's own holds the
    volume (its freeze hook takes 3 s), are accepted, not refused with
    volume_busy, and done once it ends (REVIEW-2 R6; issue #32 item 6)."""
    vol = await volume(hv, guest)
    base = Path(vol.active_file).name.split(".")[0]
    first, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
    made = settled(tcp_agent, first)
    assert made is not None and made["status"] == "available"
    await sh(hv, guest.name, "echo 3 > /run/gasnap-hook-delay")
    busy = tcp_agent.client.request("POST", "/v1/snapshots", {
        "domains": [guest.name], "disks": {guest.name: [vol.target]}, "force": True})["task"]
    try:
        # The busy create puts its overlay on top: Cinder's shape for a
        # snapshot that is no longer the newest is a commit.
        nova.assisted_volume_snapshots.delete(first, {
            "volume_id": vol.volume_id, "type": "qcow2",
            "file_to_merge": Path(made["file"]).name,
            "merge_target_file": Path(made["image"]).name})
        second, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
        assert tcp_agent.client.wait_task(busy)["state"] == "succeeded"
        gone = settled(tcp_agent, first, gone=True)
        again = settled(tcp_agent, second)
    finally:  # once nothing freezes the guest any more (the queued create did)
        await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
    assert gone is None
    assert again is not None and again["status"] == "available", again
    assert (await chain_of(hv, guest.name, vol.target))[0] == again["file"]


async def test_a_create_sent_twice_while_it_waits_is_done_once(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """Cinder may send one create twice.  Both calls wait behind a busy
    volume; the first makes the snapshot, the second finds it made and
    ends snapshot_exists, touching nothing: the record stays available and
    the volume is free at once (outside review: the second used to leave a
    journal entry that kept the volume volume_recovering for ever)."""
    vol = await volume(hv, guest)
    base = Path(vol.active_file).name.split(".")[0]
    await sh(hv, guest.name, "echo 2 > /run/gasnap-hook-delay")
    busy = tcp_agent.client.request("POST", "/v1/snapshots", {
        "domains": [guest.name], "disks": {guest.name: [vol.target]}, "force": True})["task"]
    try:
        sid = str(uuid.uuid4())
        for _ in range(2):  # the same call, twice
            nova_create(nova, vol, f"{base}.{sid}", sid)
        assert tcp_agent.client.wait_task(busy)["state"] == "succeeded"
        made = settled(tcp_agent, sid)
        creates = [t for t in tcp_agent.client.get("/v1/tasks")["tasks"]
                   if t["kind"] == "snapshot-create" and t["id"] != busy["id"]][-2:]
        ended = [tcp_agent.client.wait_task(t) for t in creates]
    finally:  # once nothing freezes the guest any more
        await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
    assert made is not None and made["status"] == "available", made
    ends = sorted((t["state"], t.get("error", {}).get("code")) for t in ended)
    assert ends == [("failed", "snapshot_exists"), ("succeeded", None)], ends
    assert (await chain_of(hv, guest.name, vol.target))[0] == made["file"]
    assert tcp_agent.client.get(f"/v1/snapshots/{sid}")["status"] == "available"
    after = tcp_agent.client.request("POST", "/v1/snapshots", {
        "domains": [guest.name], "disks": {guest.name: [vol.target]}, "force": True})["task"]
    assert tcp_agent.client.wait_task(after)["state"] == "succeeded"  # the volume is free


async def test_a_delete_a_linked_clone_blocks_is_refused_in_its_answer(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """Cinder knows nothing of gasnap's linked clones: a Nova delete of a
    snapshot a clone reads is refused in the call's answer (409), not
    accepted and then failed in a task Cinder polls for 600 s; nothing
    changes.  Once the clone is gone, the same call merges it."""
    vol = await volume(hv, guest)
    base = Path(vol.active_file).name.split(".")[0]
    sid, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
    made = settled(tcp_agent, sid)
    assert made is not None and made["status"] == "available"
    task = tcp_agent.client.request("POST", f"/v1/snapshots/{sid}/clone", {})["task"]
    done = tcp_agent.client.wait_task(task)
    assert done["state"] == "succeeded", done
    clone_id = done["result"]["clone"]["id"]
    chain = await chain_of(hv, guest.name, vol.target)
    below = chain[2] if len(chain) > 2 else None
    pull = {"volume_id": vol.volume_id, "type": "qcow2",
            "file_to_merge": Path(below).name if below else None, "merge_target_file": None}
    with pytest.raises(nova_exc.Conflict) as refused:
        nova.assisted_volume_snapshots.delete(sid, pull)
    assert "linked clones" in str(refused.value)  # snapshot_has_clones
    assert tcp_agent.client.get(f"/v1/snapshots/{sid}")["status"] == "available"
    assert await chain_of(hv, guest.name, vol.target) == chain
    assert not [t for t in tcp_agent.client.get("/v1/tasks")["tasks"]
                if t["kind"] == "snapshot-delete" and t["state"] in ("queued", "running")]
    gone = tcp_agent.client.request("DELETE", f"/v1/clones/{clone_id}")["task"]
    assert tcp_agent.client.wait_task(gone)["state"] == "succeeded"
    nova.assisted_volume_snapshots.delete(sid, pull)
    assert settled(tcp_agent, sid, gone=True) is None
    assert await chain_of(hv, guest.name, vol.target) == [chain[0], *chain[2:]]


async def test_gasnaps_own_delete_leaves_cinders_snapshots_to_cinder(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """A snapshot taken through Nova is Cinder's: gasnap's own delete of it
    is refused (409 cinder_volume), nothing changed, or Cinder's record and
    .info would name files gone; an operator who means it forces it."""
    vol = await volume(hv, guest)
    base = Path(vol.active_file).name.split(".")[0]
    sid, _ = nova_create(nova, vol, f"{base}.{uuid.uuid4()}")
    made = settled(tcp_agent, sid)
    assert made is not None and made["status"] == "available"
    chain = await chain_of(hv, guest.name, vol.target)
    with pytest.raises(ApiError) as refused:
        tcp_agent.client.request("DELETE", f"/v1/snapshots/{sid}")
    assert (refused.value.details["status"], refused.value.code) == (409, "cinder_volume")
    assert tcp_agent.client.get(f"/v1/snapshots/{sid}")["status"] == "available"
    assert await chain_of(hv, guest.name, vol.target) == chain
    task = tcp_agent.client.request("DELETE", f"/v1/snapshots/{sid}?force=true")["task"]
    assert tcp_agent.client.wait_task(task)["state"] == "succeeded"
    assert settled(tcp_agent, sid, gone=True) is None


async def test_a_raw_base_volume_through_nova(
    tcp_agent: Agent, nova: Any, hv: LibvirtHypervisor, lab: Lab
) -> None:
    """Cinder's NFS volumes are raw files: Cinder makes new_file on the raw
    base (format named), and its delete commits into the raw file.  Every
    step names the raw format; the disk stays raw in the definition."""
    dom = await lab.up(f"{PREFIX}nova-raw", disks=1, size_mib=32, disk_format="raw")
    try:
        (vol,) = dom.volumes
        base = Path(vol.active_file)
        assert vol.format == "raw"
        sid = str(uuid.uuid4())
        new_file = base.with_name(f"{base.name}.{sid}")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.name,
                        str(new_file)], check=True, cwd=base.parent)
        nova_create(nova, vol, new_file.name, sid)
        record = settled(tcp_agent, sid)
        assert record is not None and record["status"] == "available", record
        assert (record["file"], record["image"]) == (str(new_file), str(base))
        assert await chain_of(hv, dom.name, vol.target) == [str(new_file), str(base)]
        nova.assisted_volume_snapshots.delete(sid, {
            "volume_id": vol.volume_id, "type": "qcow2",
            "file_to_merge": new_file.name, "merge_target_file": base.name})
        assert settled(tcp_agent, sid, gone=True) is None
        assert await chain_of(hv, dom.name, vol.target) == [str(base)]
        assert (await hv.get_domain(dom.name)).volumes[0].format == "raw"
        assert not new_file.exists()
    finally:
        await lab.down(dom.name)
