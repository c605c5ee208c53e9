"""Deletes interrupted: the agent stopped at each step, libvirtd restarted in
the middle of a long merge.  The record ends gone or ``error_deleting``, never
``deleting``, and the chain stays whole."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import libvirtd
from conftest import (
    Agent,
    Rig,
    active_digest,
    chain_of,
    create_snapshots,
    record_digest,
    running_agent,
    wait_task,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor

# (fault point, strategy, what the record must be after the restart)
STEPS = [
    ("delete:planned", "auto", "available"),  # nothing had changed yet
    ("delete:deleting", "auto", "error_deleting"),  # marked, job never started
    ("delete:job", "pull", "gone"),  # job started: libvirt finished it
    ("delete:pivot", "commit", "gone"),  # READY, not pivoted: recovery pivots
    ("delete:merged", "auto", "gone"),
    ("delete:cleanup", "auto", "gone"),
]


def newest_two(agent: Agent, dom: Domain) -> list[dict[str, Any]]:
    made = []
    for _ in range(2):
        task = create_snapshots(agent, {"domains": [dom.name]})
        assert task["state"] == "succeeded", task
        made.append(task["result"]["snapshots"][0])
    return made


@pytest.mark.parametrize(("point", "strategy", "expected"), STEPS)
async def test_agent_stopped_at_each_delete_step(
    tmp_path: Path, rig: Rig, point: str, strategy: str, expected: str,
) -> None:
    hv, merge_guest = rig.hv, rig.merge
    agent = rig.new_agent(tmp_path, env={"GASNAP_TEST_FAULT": point})
    agent.wait_ready()
    older, victim = newest_two(agent, merge_guest)
    digest = record_digest(older)
    chain = await chain_of(hv, merge_guest.name, "vda")
    try:
        agent.client.request("DELETE", f"/v1/snapshots/{victim['id']}?strategy={strategy}")
    except ApiError as err:
        assert err.code == "agent_unreachable"
    assert agent.wait_exit() == -signal.SIGKILL
    restarted = rig.new_agent(tmp_path)
    try:
        restarted.wait_ready()
        if expected == "gone":
            # A job still copying at the restart is the sweep's to finish.
            await merged_away(restarted, victim["id"])
            now = await chain_of(hv, merge_guest.name, "vda")
            assert len(now) == len(chain) - 1
        else:
            now = await chain_of(hv, merge_guest.name, "vda")
            rec = restarted.client.get(f"/v1/snapshots/{victim['id']}")
            assert rec["status"] == expected
            assert now == chain
        assert all(Path(p).exists() for p in now)
        kept = restarted.client.get(f"/v1/snapshots/{older['id']}")
        assert (kept["status"], record_digest(kept)) == ("available", digest)
        assert now[now.index(kept["file"]) + 1] == kept["image"]
        if expected == "error_deleting":  # and it can be retried
            task = restarted.client.request("DELETE", f"/v1/snapshots/{victim['id']}")
            assert wait_task(restarted, task["task"]["id"])["state"] == "succeeded"
    finally:
        restarted.stop()


async def long_merge(agent: Agent, hv: LibvirtHypervisor, dom: Domain
                     ) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """A delete of an inner snapshot with 48 MiB to commit, under way: the
    snapshot, the disk's digest as the guest sees it, and the task."""
    first = create_snapshots(agent, {"domains": [dom.name]})["result"]["snapshots"][0]
    # 48 MiB written into first's overlay, which the next snapshot makes inner.
    await sh(hv, dom.name, "dd if=/dev/zero of=/data/long bs=1M count=48; sync", timeout=120)
    create_snapshots(agent, {"domains": [dom.name]})
    digest = await active_digest(hv, dom.name)
    task: dict[str, Any] = agent.client.request(
        "DELETE", f"/v1/snapshots/{first['id']}")["task"]
    deadline = time.monotonic() + 60
    while agent.client.get(f"/v1/tasks/{task['id']}")["progress"] < 5:
        assert time.monotonic() < deadline, "the merge did not start"
        await asyncio.sleep(0.2)
    return first, digest, task


async def test_libvirtd_restart_during_a_long_merge(
    tmp_path: Path, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    """libvirtd restarted the way this host runs it (tests/libvirtd.py), in
    the middle of a rate-limited commit: the merge still finishes."""
    managed = libvirtd.systemd_managed()
    agent = Agent(tmp_path, config="[agent]\nmerge_bandwidth = 4\n")  # MiB/s
    try:
        agent.wait_ready()
        first, digest, task = await long_merge(agent, hv, merge_guest)
        libvirtd.stop()
        await asyncio.sleep(2)
        libvirtd.start(managed)
        done = wait_task(agent, task["id"], timeout=300)
        assert done["state"] == "succeeded", done
        with pytest.raises(ApiError):
            agent.client.get(f"/v1/snapshots/{first['id']}")
        await hv.list_domains()  # a read reconnects this test's own connection
        assert await active_digest(hv, merge_guest.name) == digest
    finally:
        libvirtd.start(managed)
        agent.stop()


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout


async def test_recovery_leaves_alone_a_block_job_it_did_not_start(
    tmp_path: Path, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    """The agent dies in its commit; by the restart an operator has replaced
    that job with a pull of their own.  Recovery does not follow or pivot a
    job of another kind: the delete ends error_deleting, the job runs on."""
    agent = Agent(tmp_path, env={"GASNAP_TEST_FAULT": "delete:job"})
    agent.wait_ready()
    _older, victim = newest_two(agent, merge_guest)
    try:
        agent.client.request("DELETE", f"/v1/snapshots/{victim['id']}?strategy=commit")
    except ApiError as err:
        assert err.code == "agent_unreachable"
    assert agent.wait_exit() == -signal.SIGKILL
    virsh("blockjob", merge_guest.name, "vda", "--abort")
    virsh("blockpull", merge_guest.name, "vda", "--bandwidth", "1")
    restarted = Agent(tmp_path)
    try:
        restarted.wait_ready()
        rec = restarted.client.get(f"/v1/snapshots/{victim['id']}")
        assert rec["status"] == "error_deleting", rec
        info = subprocess.run(["virsh", "-c", "qemu:///system", "blockjob", merge_guest.name,
                               "vda", "--info"], check=True, capture_output=True, text=True)
        assert "Block Pull" in info.stdout + info.stderr  # virsh prints progress on stderr
        assert "gasnap did not start" in restarted.output()
    finally:
        subprocess.run(["virsh", "-q", "blockjob", merge_guest.name, "vda", "--abort"],
                       capture_output=True, check=False)
        restarted.stop()
    with running_agent(tmp_path) as again:  # and the delete can be retried
        task = again.client.request("DELETE", f"/v1/snapshots/{victim['id']}")["task"]
        assert wait_task(again, task["id"])["state"] == "succeeded"


async def test_a_longer_libvirtd_outage_hands_the_merge_to_the_sweep(
    tmp_path: Path, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    """REVIEW item 13: libvirtd away for longer than the merge may wait.  The
    task fails, but the record stays ``deleting`` (QEMU runs the job all
    along, never marked error_deleting under it), and once libvirtd is back
    the sweep follows the job to its end and cleans up."""
    managed = libvirtd.systemd_managed()
    agent = Agent(tmp_path, config="[agent]\nmerge_bandwidth = 4\nlibvirt_outage_wait = 2\n")
    try:
        agent.wait_ready()
        first, digest, task = await long_merge(agent, hv, merge_guest)
        libvirtd.stop()
        try:
            failed = wait_task(agent, task["id"], timeout=60)
            assert (failed["state"], failed["error"]["code"]) == ("failed",
                                                                  "libvirt_unavailable")
            assert agent.client.get(f"/v1/snapshots/{first['id']}")["status"] == "deleting"
        finally:
            libvirtd.start(managed)
        await merged_away(agent, first["id"])
        await hv.list_domains()  # a read reconnects this test's own connection
        assert await active_digest(hv, merge_guest.name) == digest
        assert not Path(first["file"]).exists()
    finally:
        libvirtd.start(managed)
        agent.stop()


async def test_a_merge_resumed_at_start_keeps_only_its_own_volume_busy(
    tmp_path: Path, hv: LibvirtHypervisor, merge_guest: Domain
) -> None:
    """REVIEW-2 item 12: the agent killed in the middle of a rate-limited
    commit comes back ready at once (the whole agent answered 503 for as
    long as the merge ran); the sweep follows the job to its end."""
    config = "[agent]\nmerge_bandwidth = 4\nsweep_interval = 1\n"  # MiB/s
    agent = Agent(tmp_path, config=config)
    try:
        agent.wait_ready()
        first, digest, _task = await long_merge(agent, hv, merge_guest)
    finally:
        agent.proc.kill()
        agent.proc.wait()
    restarted = Agent(tmp_path, config=config)
    try:
        restarted.wait_ready(30)
        target = merge_guest.volumes[0].target
        assert await hv.block_job_info(merge_guest.name, target) is not None, \
            "the merge ended before the agent was ready: the test proves nothing"
        with pytest.raises(ApiError) as busy:  # its own volume: still held
            restarted.client.request("POST", "/v1/snapshots", {"domains": [merge_guest.name]})
        assert busy.value.code == "volume_recovering", busy.value
        await merged_away(restarted, first["id"])
        assert await active_digest(hv, merge_guest.name) == digest
    finally:
        restarted.stop()


async def merged_away(agent: Agent, snapshot_id: str) -> None:
    """Until the sweep has finished the merge: the record is gone (bounded)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            agent.client.get(f"/v1/snapshots/{snapshot_id}")
        except ApiError as err:
            assert err.details["status"] == 404
            return
        assert time.monotonic() < deadline, "the sweep never finished the merge"
        await asyncio.sleep(0.5)
