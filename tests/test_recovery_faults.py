"""Recovery under faults no single crash test covers: a domain undefined while
its merge was cut short (REVIEW R3), an operation recovery cannot settle, and
libvirtd away while a create finalizes (REVIEW item 3).  Recovery settles
each operation alone, never dies, and nothing in a chain is ever removed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import libvirtd
from conftest import PREFIX, Agent, chain_of, create_snapshots, running_agent, wait_task
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab import domains
from gasnap.lab.guests import Lab, lab_home
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor


@pytest.fixture
async def doomed(lab: Lab, hv: LibvirtHypervisor) -> AsyncIterator[Domain]:
    """A lab guest that the test undefines behind gasnap's back."""
    name = f"{PREFIX}doomed"
    dom = await lab.up(name, disks=1, size_mib=96)
    yield dom
    if name in await hv.domain_names():
        await lab.down(name)
    shutil.rmtree(lab_home() / name, ignore_errors=True)


async def test_a_domain_undefined_during_a_cut_merge_does_not_stop_recovery(
    tmp_path: Path, hv: LibvirtHypervisor, doomed: Domain, guest: Domain
) -> None:
    """REVIEW R3: a slow commit, the agent SIGKILLed in it, the domain destroyed
    and undefined, the agent started again.  Recovery ends that delete
    (error_deleting, with the reason in the log) and the agent serves."""
    config = "[agent]\nmerge_bandwidth = 1\n"
    agent = Agent(tmp_path, config=config, env={"GASNAP_TEST_FAULT": "delete:job"})
    agent.wait_ready()
    first = create_snapshots(agent, {"domains": [doomed.name]})["result"]["snapshots"][0]
    await sh(hv, doomed.name, "dd if=/dev/urandom of=/data/big bs=1M count=48; sync",
             timeout=180)
    create_snapshots(agent, {"domains": [doomed.name]})
    try:
        agent.client.request("DELETE", f"/v1/snapshots/{first['id']}?strategy=commit")
    except ApiError as err:
        assert err.code == "agent_unreachable"
    assert agent.wait_exit() == -signal.SIGKILL
    files = sorted(p.name for p in Path(first["file"]).parent.iterdir())
    await hv.destroy(doomed.name)
    await domains.undefine(hv.connection, doomed.name)
    with running_agent(tmp_path, config=config) as restarted:  # ready: recovery ran
        rec = restarted.client.get(f"/v1/snapshots/{first['id']}")
        assert rec["status"] == "error_deleting", rec
        assert "not found" in restarted.output().lower() or "no domain" in \
            restarted.output().lower()
        assert sorted(p.name for p in Path(first["file"]).parent.iterdir()) == files
        # Every other domain is served.
        task = create_snapshots(restarted, {"domains": [guest.name], "quiesce": "required"})
        assert task["state"] == "succeeded", task


def _insert_op(state_dir: Path, kind: str, volumes: list[str]) -> str:
    op_id = f"op-{kind}"
    with sqlite3.connect(state_dir / "journal.db") as conn:
        conn.execute("INSERT INTO operations VALUES (?,?,?,?,?,?)",
                     (op_id, kind, "planned", json.dumps({"volumes": volumes}), time.time(),
                      time.time()))
    return op_id


async def test_an_operation_recovery_cannot_settle_holds_only_its_volumes(
    tmp_path: Path, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """One journal entry that recovery cannot settle (here: of a kind this
    version does not know): logged with its reason and traceback, retried at
    every sweep, its volume refused 409, every other volume served."""
    with running_agent(tmp_path):
        pass  # the state dir and its journal exist now
    held, free = guest.volumes[0], guest.volumes[1]
    op_id = _insert_op(tmp_path / "state", "from-the-future", [held.volume_id])
    with running_agent(tmp_path) as agent:
        log = agent.output()
        assert op_id in log and "Traceback" in log
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots", {
                "domains": [guest.name], "disks": {guest.name: [held.target]}})
        assert (info.value.details["status"], info.value.code) == (409, "volume_recovering")
        assert op_id in str(info.value)
        task = create_snapshots(agent, {"domains": [guest.name],
                                        "disks": {guest.name: [free.target]}})
        assert task["state"] == "succeeded", task
        assert agent.client.get("/v1/health")["recovery"] == "done"


async def test_libvirtd_away_while_a_create_finalizes(
    tmp_path: Path, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """REVIEW item 3: the finalize cannot read the chain (libvirtd away past
    ``libvirt_outage_wait``, which a create waits out first), so the create
    is handed to the sweep.  Until the sweep settled it, its volume
    is refused (a retry would make the overlay inner, and the old sweep then
    deleted it); afterwards the snapshot is available and its files all there.

    The refusal is asked while libvirtd is still away, so the sweep cannot
    have settled the create first; a delete asks, as it holds the volume
    before it needs libvirt (a create plans through libvirt first)."""
    target = guest.volumes[0].target
    managed = libvirtd.systemd_managed()
    agent = Agent(tmp_path, env={"GASNAP_TEST_FAULT": "create:finalizing:stop"},
                  config="[agent]\nlibvirt_outage_wait = 2\n")
    try:
        agent.wait_ready()
        task = agent.client.request("POST", "/v1/snapshots", {
            "domains": [guest.name], "disks": {guest.name: [target]}})["task"]
        deadline = time.monotonic() + 60
        while "stopping the agent at create:finalizing" not in agent.output():
            assert time.monotonic() < deadline, "the create never reached finalizing"
            await asyncio.sleep(0.1)
        libvirtd.stop()
        os.kill(agent.proc.pid, signal.SIGCONT)
        failed = wait_task(agent, task["id"])
        assert (failed["state"], failed["error"]["code"]) == ("failed", "libvirt_unavailable")
        (rec,) = agent.client.get(f"/v1/snapshots?domain={guest.name}&status=creating"
                                  )["snapshots"]
        with pytest.raises(ApiError) as info:
            agent.client.request("DELETE", f"/v1/snapshots/{rec['id']}")
        assert (info.value.details["status"], info.value.code) == (409, "volume_recovering")
        libvirtd.start(managed)
        deadline = time.monotonic() + 60
        while (rec := agent.client.get(f"/v1/snapshots/{rec['id']}"))["status"] == "creating":
            assert time.monotonic() < deadline, "the sweep never settled the create"
            await asyncio.sleep(0.5)
        assert rec["status"] == "available", rec
        agent.stop()  # its fault would stop the retry too
        with running_agent(tmp_path) as clean:
            retry = create_snapshots(clean, {"domains": [guest.name],
                                             "disks": {guest.name: [target]}})
        assert retry["state"] == "succeeded", retry
        chain = await chain_of(hv, guest.name, target)
        assert chain[chain.index(rec["file"]) + 1] == rec["image"]
        assert all(Path(p).exists() for p in chain)
    finally:
        libvirtd.start(managed)
        if agent.proc.poll() is None:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.stop()
