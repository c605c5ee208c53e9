"""Deleting snapshots against a real guest: every strategy, live and offline,
with the invariant checked each time."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    GASNAP,
    Agent,
    Rig,
    active_digest,
    chain_of,
    commit_by_hand,
    create_snapshots,
    delete_snapshot,
    gasnap,
    qemu_open_files,
    record_digest,
    running_agent,
    wait_task,
)
from gasnap import domxml
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.images import overlay_path
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh, start_load, stop_load
from gasnap.metadata import Status
from gasnap.metastore import open_sqlite
from gasnap.virt import LibvirtHypervisor


def snapshots(agent: Agent, dom: Domain, count: int) -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        task = create_snapshots(agent, {"domains": [dom.name], "name": f"d{i}"})
        assert task["state"] == "succeeded", task
        made.append(task["result"]["snapshots"][0])
    return made


def records(agent: Agent, dom: Domain) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in
            agent.client.get(f"/v1/snapshots?domain={dom.name}&status=available")["snapshots"]}


async def live_digest(hv: LibvirtHypervisor, dom: Domain) -> str:
    return await active_digest(hv, dom.name)


class Before:
    """What the invariant compares against: taken just before a delete."""

    def __init__(self, agent: Agent, chain: list[str], recs: dict[str, dict[str, Any]]) -> None:
        self.agent = agent
        self.chain = chain
        self.records = recs
        self.digests = {sid: record_digest(r) for sid, r in recs.items()}


async def before(agent: Agent, hv: LibvirtHypervisor, dom: Domain) -> Before:
    return Before(agent, await chain_of(hv, dom.name, "vda"), records(agent, dom))


async def check_invariant(hv: LibvirtHypervisor, dom: Domain, was: Before, deleted: str,
                          task: dict[str, Any]) -> None:
    assert task["state"] == "succeeded", task
    removed = task["result"]["removed"]
    chain = await chain_of(hv, dom.name, "vda")
    assert chain == [p for p in was.chain if p != removed]  # one file shorter
    assert not Path(removed).exists()
    if isinstance(hv, LibvirtHypervisor):
        # The persistent definition is in step: a cold boot must not name the old file.
        (persistent,) = domxml.disks(await hv.domain_xml(dom.name, inactive=True))
        assert [layer.path for layer in persistent.chain] == chain[:len(persistent.chain)]
    else:
        # QEMU keeps no file open that the chain left (its node was deleted).
        assert removed not in qemu_open_files(hv, dom.name)
    with pytest.raises(ApiError) as info:
        was.agent.client.get(f"/v1/snapshots/{deleted}")
    assert info.value.details["status"] == 404
    now = records(was.agent, dom)
    assert set(now) == set(was.records) - {deleted}
    for sid, rec in now.items():
        index = chain.index(rec["file"])
        assert chain[index + 1] == rec["image"]  # records point at the files that hold it
        assert record_digest(rec) == was.digests[sid]


# --- strategies -------------------------------------------------------------------


@pytest.fixture(params=["qcow2", "raw"])
def merging(request: pytest.FixtureRequest) -> Domain:
    """The guest to merge on: its data disk qcow2, or raw (the formats of
    every layer are named from the XML and the headers gasnap wrote)."""
    name = "merge_guest" if request.param == "qcow2" else "raw_guest"
    dom: Domain = request.getfixturevalue(name)
    return dom


@pytest.fixture(params=["qcow2", "raw"])
def live_merging(request: pytest.FixtureRequest, rig: Rig) -> Domain:
    """``merging`` on each hypervisor backend."""
    return rig.merge if request.param == "qcow2" else rig.raw


@pytest.mark.parametrize(
    ("position", "strategy", "method"),
    [
        ("inner", "auto", "commit"),
        ("oldest", "auto", "commit"),
        ("newest", "pull", "pull"),
        ("newest", "commit", "active-commit"),
    ],
)
async def test_delete_keeps_every_other_point_in_time(
    rig: Rig, live_merging: Domain, position: str, strategy: str, method: str,
) -> None:
    agent, hv, merge_guest = rig.agent, rig.hv, live_merging
    made = snapshots(agent, merge_guest, 3)
    await sh(hv, merge_guest.name,
             "head -c 2097152 /dev/urandom > /data/after-snaps; sync")
    target = {"inner": made[1], "oldest": made[0], "newest": made[2]}[position]
    live = await live_digest(hv, merge_guest)
    was = await before(agent, hv, merge_guest)
    task = delete_snapshot(agent, target["id"], strategy)
    assert task["result"]["strategy"] == method
    await check_invariant(hv, merge_guest, was, target["id"], task)
    assert await live_digest(hv, merge_guest) == live  # the guest sees the same disk


async def test_auto_picks_the_strategy_that_moves_less(
    agent: Agent, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    (older,) = snapshots(agent, merge_guest, 1)
    await sh(hv, merge_guest.name, "dd if=/dev/zero of=/data/big bs=1M count=24; sync")
    (newest,) = snapshots(agent, merge_guest, 1)
    # The newest overlay is nearly empty, its image holds 24 MiB: commit wins.
    was = await before(agent, hv, merge_guest)
    task = delete_snapshot(agent, newest["id"])
    assert task["result"]["strategy"] == "active-commit"
    assert task["result"]["merged_bytes"] < 24 << 20
    await check_invariant(hv, merge_guest, was, newest["id"], task)
    assert older["id"] in records(agent, merge_guest)


async def test_delete_all_one_by_one_under_load_then_reboot(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, merge_guest: Domain
) -> None:
    await sh(hv, merge_guest.name, "head -c 4194304 /dev/urandom > /data/marker; sync")
    marker = await sh(hv, merge_guest.name, "sha256sum /data/marker")
    await start_load(hv, merge_guest.name)
    try:
        made = snapshots(agent, merge_guest, 4)
        for victim in (made[1], made[3], made[0], made[2]):
            was = await before(agent, hv, merge_guest)
            task = delete_snapshot(agent, victim["id"])
            await check_invariant(hv, merge_guest, was, victim["id"], task)
    finally:
        await stop_load(hv, merge_guest.name)
    assert not set(records(agent, merge_guest)) & {m["id"] for m in made}
    await lab.reboot(merge_guest.name)
    assert await sh(hv, merge_guest.name, "sha256sum /data/marker") == marker


async def test_offline_deletes(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, merging: Domain
) -> None:
    merge_guest = merging
    await sh(hv, merge_guest.name, "head -c 1048576 /dev/urandom > /data/offline; sync")
    marker = await sh(hv, merge_guest.name, "sha256sum /data/offline")
    made = snapshots(agent, merge_guest, 4)
    await hv.destroy(merge_guest.name)
    try:
        for victim, strategy, method in ((made[1], "auto", "offline-commit"),
                                         (made[3], "pull", "offline-pull"),
                                         (made[2], "commit", "offline-commit")):
            was = await before(agent, hv, merge_guest)
            task = delete_snapshot(agent, victim["id"], strategy)
            assert task["result"]["strategy"] == method
            await check_invariant(hv, merge_guest, was, victim["id"], task)
        inactive = subprocess.run(["virsh", "dumpxml", "--inactive", merge_guest.name],
                                  capture_output=True, text=True, check=True).stdout
        assert f"<source file='{(await chain_of(hv, merge_guest.name, 'vda'))[0]}'/>" in inactive
    finally:
        await lab.up(merge_guest.name)
    assert await sh(hv, merge_guest.name, "sha256sum /data/offline") == marker
    remaining = records(agent, merge_guest)
    assert made[0]["id"] in remaining
    chain = await chain_of(hv, merge_guest.name, "vda")
    assert chain.index(remaining[made[0]["id"]]["image"]) == \
        chain.index(remaining[made[0]["id"]]["file"]) + 1


async def test_paused_domain_is_merged_live(
    agent: Agent, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    made = snapshots(agent, merge_guest, 2)
    subprocess.run(["virsh", "suspend", merge_guest.name], check=True, capture_output=True)
    try:
        was = await before(agent, hv, merge_guest)
        task = delete_snapshot(agent, made[1]["id"], "commit")
        await check_invariant(hv, merge_guest, was, made[1]["id"], task)
    finally:
        subprocess.run(["virsh", "resume", merge_guest.name], check=True, capture_output=True)


# --- bad input --------------------------------------------------------------------


async def refused(agent: Agent, hv: Any, dom: Domain, path: str,
                  status: int, code: str) -> None:
    chain = await chain_of(hv, dom.name, "vda")
    recs = agent.client.get("/v1/snapshots")["snapshots"]
    files = disk_files(chain[0])
    with pytest.raises(ApiError) as info:
        agent.client.request("DELETE", path)
    assert (info.value.details["status"], info.value.code) == (status, code), info.value
    assert await chain_of(hv, dom.name, "vda") == chain
    assert agent.client.get("/v1/snapshots")["snapshots"] == recs
    assert disk_files(chain[0]) == files


def disk_files(active: str) -> list[Path]:
    """The guest's files, without the spare overlays the agent may be making
    in the background meanwhile (gasnap.spares)."""
    return sorted(p for p in Path(active).parent.iterdir() if ".gasnap-spare" not in p.name)


async def test_bad_delete_requests_change_nothing(rig: Rig, tmp_path: Path) -> None:
    # An agent of its own: the records this test leaves wrong on purpose
    # must not reach the other tests' invariants.
    with running_agent(tmp_path, config=rig.toml()) as agent:
        await _bad_delete_requests(agent, rig)


async def _bad_delete_requests(agent: Agent, rig: Rig) -> None:
    hv, merge_guest = rig.hv, rig.merge
    made = snapshots(agent, merge_guest, 3)
    await refused(agent, hv, merge_guest, "/v1/snapshots/no-such-id", 404, "snapshot_not_found")
    await refused(agent, hv, merge_guest, f"/v1/snapshots/{made[1]['id']}?strategy=pull",
                  409, "strategy_unsupported")
    await refused(agent, hv, merge_guest, f"/v1/snapshots/{made[1]['id']}?strategy=fast",
                  400, "invalid_request")
    # A record in the wrong status.
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.update_snapshot_status(made[0]["id"], Status.DELETING, "0%")
    await store.close()
    await refused(agent, hv, merge_guest, f"/v1/snapshots/{made[0]['id']}", 409, "wrong_status")
    # A chain changed behind gasnap's back: made[1]'s overlay committed by hand.
    await commit_by_hand(rig, merge_guest.name, "vda", made[1]["file"], made[1]["image"])
    await refused(agent, hv, merge_guest, f"/v1/snapshots/{made[1]['id']}", 409,
                  "chain_mismatch")


# The same 8 MiB rewritten again and again, as fast as the guest can: the
# blocks the commit has just copied are dirty again before it is done.  The
# first pass is written before the delete starts: the commit then begins
# with 8 MiB to copy, not with an empty overlay it is done with at once.
_PASS = "dd if=/dev/zero of=/data/outrun bs=1M count=8 conv=fsync,notrunc 2>/dev/null"
OUTRUN = (f"rm -f /run/outrun-stop; {_PASS}; (while [ ! -e /run/outrun-stop ]; do {_PASS}; "
          "done) </dev/null >/dev/null 2>&1 &")


async def test_an_active_commit_the_guest_outruns_ends_bounded(rig: Rig, tmp_path: Path
                                                                ) -> None:
    """A guest that writes faster than an active commit copies (held here to
    1 MiB/s by merge_bandwidth) keeps QEMU's mirror from ever being ready.
    The delete ends once the bytes left to copy have made no new low for
    merge_converge_timeout: the job cancelled, the chain as it was, the
    record error_deleting (delete it again).  Once the guest writes less
    (and the commit is not held back), the same delete goes through."""
    dom = rig.merge
    config = rig.toml(merge_bandwidth=1, merge_converge_timeout=4)
    with running_agent(tmp_path, config=config) as agent:
        (made,) = snapshots(agent, dom, 1)
        chain = await chain_of(rig.hv, dom.name, "vda")
        await sh(rig.hv, dom.name, OUTRUN)
        try:
            task = agent.client.request("DELETE",
                                        f"/v1/snapshots/{made['id']}?strategy=commit")["task"]
            done = wait_task(agent, task["id"], timeout=120)
        finally:
            await sh(rig.hv, dom.name, "touch /run/outrun-stop; sleep 2; sync")
        assert (done["state"], done["error"]["code"]) == ("failed", "merge_not_converging"), done
        assert await chain_of(rig.hv, dom.name, "vda") == chain
        assert await rig.hv.block_job_info(dom.name, "vda") is None
        assert agent.client.get(f"/v1/snapshots/{made['id']}")["status"] == "error_deleting"
    # The guest writes less now, and the commit may go as fast as the disk:
    # the same delete goes through (the agent's records are in its state dir).
    with running_agent(tmp_path, config=rig.toml(merge_converge_timeout=4)) as agent:
        again = delete_snapshot(agent, made["id"], "commit")
        assert again["state"] == "succeeded", again
        assert await chain_of(rig.hv, dom.name, "vda") == chain[1:]


async def test_a_busy_volume_refuses_a_delete(
    agent: Agent, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    made = snapshots(agent, merge_guest, 1)
    await sh(hv, merge_guest.name, "echo 3 > /run/gasnap-hook-delay")
    active = (await chain_of(hv, merge_guest.name, "vda"))[0]
    first = agent.client.request("POST", "/v1/snapshots", {"domains": [merge_guest.name]})
    try:
        # Once the create's overlay exists it sits in its (3 s) freeze and
        # nothing else changes: only now is "nothing changed" measurable.
        deadline = time.monotonic() + 30
        while not any(Path(overlay_path(active, r["volume_id"], r["id"])).exists()
                      for r in agent.client.get(f"/v1/snapshots?domain={merge_guest.name}"
                                                "&status=creating")["snapshots"]):
            assert time.monotonic() < deadline, "the create never made its overlay"
            await asyncio.sleep(0.05)
        await refused(agent, hv, merge_guest, f"/v1/snapshots/{made[0]['id']}", 409,
                      "volume_busy")
    finally:
        assert wait_task(agent, first["task"]["id"])["state"] == "succeeded"
        await sh(hv, merge_guest.name, "rm -f /run/gasnap-hook-delay")


def test_cli_delete(agent: Agent, merge_guest: Domain) -> None:
    made = snapshots(agent, merge_guest, 2)
    api = ["--api", agent.api]
    queued = json.loads(gasnap(*api, "snapshot", "delete", made[0]["id"],
                                             "--no-wait", "--json").stdout)
    assert queued["kind"] == "snapshot-delete"
    done = json.loads(gasnap(*api, "task", "wait", queued["id"], "--json").stdout)
    assert (done["state"], done["progress"]) == ("succeeded", 100)
    # On a terminal: a progress bar on stderr, then the summary.
    shown = subprocess.run(
        ["script", "-qec", " ".join([*GASNAP, *api, "snapshot",
                                      "delete", made[1]["id"]]), "/dev/null"],
        capture_output=True, text=True, check=True).stdout
    assert "succeeded" in shown
