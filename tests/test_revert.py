"""Revert on lab guests (qcow2 and raw data disks): the state left is kept
first, the guest comes back at the snapshot's instant, the branch left stays
whole, a revert is undone by reverting to its before-revert snapshots, and
deletes at branch points keep every other snapshot's image byte for byte."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    PREFIX,
    Agent,
    backing_path,
    chain_of,
    create_snapshots,
    delete_snapshot,
    gasnap,
    image_digest,
    record_digest,
    snap,
    wait_task,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain, DomainState
from gasnap.images import read_qcow2_header
from gasnap.lab.guests import Lab
from gasnap.lab.verify import fsck_image
from gasnap.lab.workload import sh
from gasnap.metadata import Consistency, Finalization, NewSnapshot, Status
from gasnap.metastore import open_sqlite
from gasnap.virt import LibvirtHypervisor


@pytest.fixture(scope="module", params=["qcow2", "raw"])
async def reverting(request: pytest.FixtureRequest, lab: Lab) -> AsyncIterator[Domain]:
    """A lab guest of its own: reverts power it off and on."""
    dom = await lab.up(f"{PREFIX}revert-{request.param}", disks=1, size_mib=32,
                       disk_format=request.param)
    yield dom
    await lab.down(dom.name)


def revert(agent: Agent, snapshot_id: str, **body: Any) -> dict[str, Any]:
    task = agent.client.request("POST", f"/v1/snapshots/{snapshot_id}/revert", body)["task"]
    return wait_task(agent, task["id"], timeout=300)


def records(agent: Agent, dom: Domain) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in agent.client.get(
        f"/v1/snapshots?domain={dom.name}")["snapshots"]}


async def files_in(guest: str, hv: LibvirtHypervisor) -> set[str]:
    return set((await sh(hv, guest, "ls /data")).split())


async def wait_booted(lab: Lab, name: str) -> None:
    await lab.wait_for_agent(name, timeout=180)


async def test_revert_keeps_the_state_it_leaves_and_can_be_undone(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, reverting: Domain
) -> None:
    name = reverting.name
    await sh(hv, name, "echo A > /data/a && sync")
    s1 = snap(agent, reverting, "s1")
    await sh(hv, name, "echo B > /data/b && sync")
    s2 = snap(agent, reverting, "s2")
    await sh(hv, name, "echo C > /data/c && sync")
    s2_digest = record_digest(s2)
    assert (s1["parent"], s2["parent"]) == (None, s1["id"])
    assert (s1["origin"], s1["domain_state"], s1["memory_file"]) == ("created", "running", None)

    # Running: refused unless forced, and nothing changed.
    chain = await chain_of(hv, name, "vda")
    with pytest.raises(ApiError) as refused:
        agent.client.request("POST", f"/v1/snapshots/{s1['id']}/revert", {})
    assert (refused.value.details["status"], refused.value.code) == (409, "domain_running")
    assert await chain_of(hv, name, "vda") == chain

    # Forced, left off: the active chain is a fresh overlay on S1's image.
    task = revert(agent, s1["id"], force=True, start=False)
    assert task["state"] == "succeeded", task
    result = task["result"]
    assert (result["reverted"], result["domains"]) == ([s1["id"]], [name])
    assert set(result["phases"]) == {"before", "stopping", "overlays", "switching", "starting"}
    (before_id,) = result["before"]
    assert (await hv.get_domain(name)).state is DomainState.SHUTOFF
    new_chain = await chain_of(hv, name, "vda")
    assert new_chain[1:] == [s1["image"], *chain[chain.index(s1["image"]) + 1:]]
    assert new_chain[0] not in chain
    fsck = await fsck_image(new_chain[0], "qcow2")
    assert fsck.clean, fsck
    assert record_digest(s2) == s2_digest
    before = agent.client.get(f"/v1/snapshots/{before_id}")
    assert (before["origin"], before["status"], before["parent"]) == (
        "before-revert", "available", s2["id"])
    assert before["image"] == chain[0]  # the state left, kept whole
    (volume,) = agent.client.get(f"/v1/domains/{name}")["volumes"]
    assert volume["current"] == s1["id"]

    await hv.start(name)
    await wait_booted(lab, name)
    assert await files_in(name, hv) >= {"a"}
    assert not await files_in(name, hv) & {"b", "c"}

    # The tree, through the API and the CLI.
    children = agent.client.get(f"/v1/snapshots?parent={s1['id']}")["snapshots"]
    assert [c["id"] for c in children] == [s2["id"]]
    roots = agent.client.get(f"/v1/snapshots?roots=true&volume_id={s1['volume_id']}")
    assert [r["id"] for r in roots["snapshots"]] == [s1["id"]]
    listed = gasnap("--api", agent.api, "snapshot", "list", "--parent", s2["id"], "--json")
    assert before_id in listed.stdout

    # Undo, through the CLI: C is back, and the guest runs again by itself.
    out = gasnap("--api", agent.api, "snapshot", "revert", before_id, "--force", "--json")
    undo = json.loads(out.stdout)
    assert undo["state"] == "succeeded", undo
    await wait_booted(lab, name)
    assert await files_in(name, hv) >= {"a", "b", "c"}

    # Deletes at branch points: commit is refused (S1's image backs two
    # files now), auto pulls, and every other snapshot's image stays byte
    # for byte.
    with pytest.raises(ApiError) as refused:
        agent.client.request("DELETE", f"/v1/snapshots/{s1['id']}?strategy=commit")
    assert (refused.value.details["status"], refused.value.code) == (409, "has_dependents")
    digests = {rid: record_digest(r) for rid, r in records(agent, reverting).items()}
    # The undo's running chain passes through S2's overlay, not through the
    # first revert's before-revert overlay: that leaf is dropped unmerged.
    for doomed, method in ((s1["id"], "branch-pull"), (before_id, "drop")):
        task = delete_snapshot(agent, doomed)
        assert task["state"] == "succeeded", task
        assert task["result"]["strategy"] == method
        del digests[doomed]
        left = records(agent, reverting)
        assert {rid: record_digest(r) for rid, r in left.items()} == digests
    assert await files_in(name, hv) >= {"a", "b", "c"}
    await _check_no_stray_files(agent, hv, reverting)


LATE = '::shutdown:/bin/sh -c "echo late > /data/late"'


@pytest.mark.parametrize("reverting", ["qcow2"], indirect=True)
async def test_a_forced_revert_keeps_the_last_byte_the_guest_wrote(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, reverting: Domain
) -> None:
    """REVIEW-2 item 3: the state a forced disk-only revert leaves is the
    guest's after its power-off, whose own shutdown writes a file here (a
    ::shutdown: entry before busybox's sync).  Kept before the power-off,
    that write went into an overlay no revert reads."""
    name = reverting.name
    target = snap(agent, reverting, "before-the-late-write")
    await sh(hv, name, f"{{ grep -v shutdown /etc/inittab; echo '{LATE}'; "
                       "grep shutdown /etc/inittab; } > /tmp/inittab && "
                       "cp /tmp/inittab /etc/inittab && kill -HUP 1")
    task = revert(agent, target["id"], force=True)
    assert task["state"] == "succeeded", task
    (before_id,) = task["result"]["before"]
    await wait_booted(lab, name)
    assert "late" not in await files_in(name, hv)
    task = revert(agent, before_id, force=True)
    assert task["state"] == "succeeded", task
    await wait_booted(lab, name)
    assert (await sh(hv, name, "cat /data/late")).strip() == "late"


async def test_deletes_below_a_revert_keep_the_branch_it_left(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, reverting: Domain
) -> None:
    """The soak's broken branch: reverted to B, the running chain passes
    through A's overlay, which B's branch also backs onto.  Deleting A must
    not commit that overlay away: it pulls A's image up instead, and while a
    snapshot's overlay is the active layer (C) even that would take C off its
    image, so the delete is refused until C is gone."""
    name = reverting.name
    existing = frozenset(await volume_files(hv, reverting))
    await sh(hv, name, "echo A > /data/ba && sync")
    sa = snap(agent, reverting, "below-a")
    await sh(hv, name, "echo B > /data/bb && sync")
    sb = snap(agent, reverting, "below-b")
    task = revert(agent, sb["id"], force=True)
    assert task["state"] == "succeeded", task
    await wait_booted(lab, name)
    sc = snap(agent, reverting, "below-c")
    chain = await chain_of(hv, name, "vda")
    files = await volume_files(hv, reverting)
    digests = {rid: record_digest(r) for rid, r in records(agent, reverting).items()}

    with pytest.raises(ApiError) as refused:
        agent.client.request("DELETE", f"/v1/snapshots/{sa['id']}")
    assert (refused.value.details["status"], refused.value.code) == (409, "has_dependents")
    assert sc["id"] in refused.value.message
    assert (await chain_of(hv, name, "vda"), await volume_files(hv, reverting)) == (
        chain, files)

    for doomed in (sc["id"], sa["id"]):
        task = delete_snapshot(agent, doomed)
        assert task["state"] == "succeeded", task
        del digests[doomed]
    left = records(agent, reverting)
    assert {rid: record_digest(r) for rid, r in left.items()} == digests
    for rec in left.values():
        assert backing_path(rec["file"]) == rec["image"], rec
    assert left[sb["id"]]["image"] == sa["file"]  # the branch's base stayed
    assert await files_in(name, hv) >= {"ba", "bb"}
    await _check_no_stray_files(agent, hv, reverting, existing)


@pytest.mark.parametrize("reverting", ["qcow2"], indirect=True)  # raw: the undo above
async def test_the_branch_a_revert_left_goes_whole_with_its_records(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, reverting: Domain
) -> None:
    """The soak's orphans: reverted to A, the state left is the before-revert
    snapshot R's (A's overlay, R's overlay on it).  Deleting R, then A, must
    leave no file behind; merging R's image into R's overlay used to, and
    then flattened the running base to take A's image out."""
    name = reverting.name
    existing = frozenset(await volume_files(hv, reverting))
    await sh(hv, name, "echo D > /data/da && sync")
    sa = snap(agent, reverting, "drop-a")
    await sh(hv, name, "echo E > /data/db && sync")
    task = revert(agent, sa["id"], force=True)
    assert task["state"] == "succeeded", task
    (before_id,) = task["result"]["before"]
    await wait_booted(lab, name)
    running = await chain_of(hv, name, "vda")
    assert running[1] == sa["image"]
    image_format = str(read_qcow2_header(sa["file"]).backing_format)
    digest = image_digest(sa["image"], image_format)
    for doomed in (before_id, sa["id"]):
        task = delete_snapshot(agent, doomed)
        assert task["state"] == "succeeded", task
        assert task["result"]["strategy"] == "drop"
        assert await chain_of(hv, name, "vda") == running
    assert not Path(sa["file"]).exists()
    assert image_digest(sa["image"], image_format) == digest  # runs on, untouched
    assert await files_in(name, hv) >= {"da"}
    assert "db" not in await files_in(name, hv)
    await _check_no_stray_files(agent, hv, reverting, existing)


async def volume_files(hv: LibvirtHypervisor, dom: Domain) -> set[str]:
    """The files of DOM's one volume (its spare, hidden, aside)."""
    vol = (await hv.get_domain(dom.name)).volumes[0]
    base = Path(vol.active_file).name.split(".")[0]
    return {str(p) for p in Path(vol.active_file).parent.iterdir()
            if p.name.startswith(base)}


async def _check_no_stray_files(agent: Agent, hv: LibvirtHypervisor, dom: Domain,
                                existing: frozenset[str] = frozenset()) -> None:
    """Every file of the volume (but those EXISTING before, which other
    agents' records name) is the active chain's or a record's."""
    vol = (await hv.get_domain(dom.name)).volumes[0]
    known = {layer.path for layer in vol.chain}
    for rec in records(agent, dom).values():
        known |= {rec["file"], rec["image"]} - {None}
    assert await volume_files(hv, dom) - existing == known - existing


@pytest.fixture(scope="module")
async def pair(lab: Lab) -> AsyncIterator[list[Domain]]:
    doms = [await lab.up(f"{PREFIX}revert-{side}", disks=1, size_mib=32) for side in "xy"]
    yield doms
    for dom in doms:
        await lab.down(dom.name)


async def test_a_group_goes_back_to_one_instant(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, pair: list[Domain]
) -> None:
    for dom in pair:
        await sh(hv, dom.name, "echo X > /data/x && sync")
    task = create_snapshots(agent, {"domains": [d.name for d in pair], "name": "g"})
    assert task["state"] == "succeeded", task
    group = task["result"]["snapshots"]
    for dom in pair:
        await sh(hv, dom.name, "echo Y > /data/y && sync")
    task = revert(agent, group[1]["id"], force=True)
    assert task["state"] == "succeeded", task
    assert sorted(task["result"]["reverted"]) == sorted(r["id"] for r in group)
    assert len(task["result"]["before"]) == 2
    for dom in pair:
        await wait_booted(lab, dom.name)
        assert "x" in await files_in(dom.name, hv)
        assert "y" not in await files_in(dom.name, hv)
    # scope=volume takes the one volume only (the other domain stays as it is).
    task = revert(agent, task["result"]["before"][0], force=True, scope="volume")
    assert task["state"] == "succeeded", task
    assert len(task["result"]["domains"]) == 1


async def test_a_revert_holds_every_disk_of_its_domain(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab
) -> None:
    """The soak: a revert of one disk shut the domain down; a delete on its
    other disk, planned meanwhile, merged offline with qemu-img, and the
    revert started the domain under it.  A revert holds every disk of the
    domains it stops and starts, until it ends."""
    dom = await lab.up(f"{PREFIX}revert-two", disks=2, size_mib=32)
    try:
        made = create_snapshots(agent, {"domains": [dom.name]})
        assert made["state"] == "succeeded", made
        by_target = {s["target"]: s for s in made["result"]["snapshots"]}
        going = agent.client.request("POST", f"/v1/snapshots/{by_target['vda']['id']}/revert",
                                     {"scope": "volume", "force": True, "start": False})["task"]
        other = by_target["vdb"]
        with pytest.raises(ApiError) as busy:
            agent.client.request("DELETE", f"/v1/snapshots/{other['id']}")
        assert busy.value.code == "volume_busy" and going["id"] in busy.value.message
        done = wait_task(agent, going["id"], timeout=300)
        assert done["state"] == "succeeded", done
        assert agent.client.get(f"/v1/snapshots/{other['id']}")["status"] == "available"
        task = delete_snapshot(agent, other["id"])
        assert task["state"] == "succeeded", task
        assert task["result"]["strategy"].startswith("offline-")
    finally:
        await lab.down(dom.name)


async def test_bad_revert_requests_change_nothing(
    agent: Agent, hv: LibvirtHypervisor, reverting: Domain
) -> None:
    chain = await chain_of(hv, reverting.name, "vda")
    made = snap(agent, reverting, "bad-input")

    def refused(path: str, body: Any, status: int, code: str) -> None:
        with pytest.raises(ApiError) as err:
            agent.client.request("POST", path, body)
        assert (err.value.details["status"], err.value.code) == (status, code)

    refused("/v1/snapshots/no-such-id/revert", {}, 404, "snapshot_not_found")
    refused(f"/v1/snapshots/{made['id']}/revert", {"scope": "all"}, 400, "invalid_request")
    refused(f"/v1/snapshots/{made['id']}/revert", {"force": "yes"}, 400, "invalid_request")
    refused(f"/v1/snapshots/{made['id']}/revert", {"later": 1}, 400, "invalid_request")
    # A record whose domain is gone, and one that is not available.
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.create_snapshot_metadata(NewSnapshot(
        "gone-1", "vol-gone", "n", "", 1, "2026-01-01T00:00:00Z", f"{PREFIX}no-such-domain",
        target="vda"))
    await store.finalize_snapshot_metadata("gone-1", Finalization(
        Status.AVAILABLE, "/nowhere/f.1", "/nowhere/f", Consistency.CRASH))
    await store.update_snapshot_status(made["id"], Status.DELETING, "0%")
    await store.close()
    refused("/v1/snapshots/gone-1/revert", {"force": True}, 404, "domain_not_found")
    refused(f"/v1/snapshots/{made['id']}/revert", {"force": True}, 409, "wrong_status")
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.update_snapshot_status(made["id"], Status.ERROR_DELETING, "0%")
    await store.close()
    assert (await hv.get_domain(reverting.name)).state is DomainState.RUNNING
    assert await chain_of(hv, reverting.name, "vda") == [made["file"], *chain]
    # A volume busy with another task: 409 volume_busy, nothing changed.
    available = snap(agent, reverting, "busy-target")
    await sh(hv, reverting.name, "echo 3 > /run/gasnap-hook-delay")
    try:
        busy = agent.client.request("POST", "/v1/snapshots", {"domains": [reverting.name]})
        try:
            refused(f"/v1/snapshots/{available['id']}/revert", {"force": True}, 409,
                    "volume_busy")
        finally:
            done = wait_task(agent, busy["task"]["id"])  # thawed again
    finally:
        await sh(hv, reverting.name, "rm -f /run/gasnap-hook-delay")
    assert done["state"] == "succeeded", done
    assert (await hv.get_domain(reverting.name)).state is DomainState.RUNNING


# --- crash safety -------------------------------------------------------------------

POINTS = ["revert:planned", "revert:before", "revert:stopping", "revert:overlays",
          "revert:switching"]


@pytest.mark.parametrize("reverting", ["qcow2"], indirect=True)
@pytest.mark.parametrize("point", POINTS)
async def test_a_revert_cut_short_anywhere_converges(
    tmp_path: Path, hv: LibvirtHypervisor, lab: Lab, reverting: Domain, point: str
) -> None:
    """Killed at each step and restarted: the domain runs on a consistent
    chain (the old one before the switch, the snapshot's after), records
    match the live XML, and no overlay is left over."""
    name, step = reverting.name, point.split(":")[1]
    existing = frozenset(await volume_files(hv, reverting))
    first = Agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    try:
        first.wait_ready()
        await sh(hv, name, f"echo K > /data/k-{step} && sync")
        target = snap(first, reverting, f"cut-{point}")
        await sh(hv, name, f"echo L > /data/l-{step} && sync")
        old_chain = await chain_of(hv, name, "vda")
        first.client.request("POST", f"/v1/snapshots/{target['id']}/revert", {"force": True})
        assert first.wait_exit(300) == -signal.SIGKILL
    finally:
        first.stop()
    restarted = Agent(tmp_path)
    try:
        restarted.wait_ready(300)
        await wait_booted(lab, name)
        assert (await hv.get_domain(name)).state is DomainState.RUNNING
        assert f"k-{step}" in await files_in(name, hv)
        chain = await chain_of(hv, name, "vda")
        now = records(restarted, reverting)
        assert {r["status"] for r in now.values()} <= {"available"}
        if chain[1:] == old_chain[1:] and chain[0] != old_chain[0]:  # switched
            assert point == "revert:switching"
            assert f"l-{step}" not in await files_in(name, hv)
        else:  # not switched: the chain it had (and perhaps a before-revert on it)
            assert chain[-len(old_chain):] == old_chain
            assert f"l-{step}" in await files_in(name, hv)
        await _check_no_stray_files(restarted, hv, reverting, existing)
        assert existing <= await volume_files(hv, reverting)
    finally:
        restarted.stop()


@pytest.mark.parametrize("reverting", ["qcow2"], indirect=True)
async def test_a_drop_cut_short_converges(
    tmp_path: Path, hv: LibvirtHypervisor, lab: Lab, reverting: Domain
) -> None:
    """A drop removes nothing before its clean-up.  Killed once the record
    is deleting: error_deleting, every file kept.  Killed again at the
    clean-up: the restarted agent removes the overlay and the record."""
    name = reverting.name
    existing = frozenset(await volume_files(hv, reverting))
    first = Agent(tmp_path, env={"GASNAP_TEST_FAULT": "delete:deleting"})
    try:
        first.wait_ready()
        kept = snap(first, reverting, "cut-drop")
        task = revert(first, kept["id"], force=True)
        assert task["state"] == "succeeded", task
        (before_id,) = task["result"]["before"]
        dropped = first.client.get(f"/v1/snapshots/{before_id}")["file"]
        await wait_booted(lab, name)
        files = await volume_files(hv, reverting)
        _delete_until_killed(first, before_id)
    finally:
        first.stop()
    second = Agent(tmp_path, env={"GASNAP_TEST_FAULT": "delete:cleanup"})
    try:
        second.wait_ready()
        assert second.client.get(f"/v1/snapshots/{before_id}")["status"] == "error_deleting"
        assert await volume_files(hv, reverting) == files
        _delete_until_killed(second, before_id)
    finally:
        second.stop()
    third = Agent(tmp_path)
    try:
        third.wait_ready()
        with pytest.raises(ApiError) as gone:
            third.client.get(f"/v1/snapshots/{before_id}")
        assert gone.value.details["status"] == 404
        assert not Path(dropped).exists()
        assert await volume_files(hv, reverting) == files - {dropped}
        await _check_no_stray_files(third, hv, reverting, existing)
    finally:
        third.stop()


def _delete_until_killed(agent: Agent, snapshot_id: str) -> None:
    try:
        agent.client.request("DELETE", f"/v1/snapshots/{snapshot_id}")
    except ApiError as err:
        assert err.code == "agent_unreachable"
    assert agent.wait_exit() == -signal.SIGKILL
