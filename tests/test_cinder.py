"""gasnap as Nova for a Cinder: every assisted create and delete is reported
back with os-update_snapshot_status through the real python-cinderclient
and keystoneauth1, landing on the reference service's stand-in for Cinder,
which validates it as Cinder does.  The test plays Cinder's API and its
remotefs driver around it (make the snapshot, call Nova through the real
novaclient, wait for 90 %), including a Cinder outage in between and an
agent killed before it could report."""

from __future__ import annotations

import asyncio
import os
import signal
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

from conftest import Agent, chain_of, running_agent
from gasnap.hypervisor import Domain
from gasnap.metaserver.keystone import TOKEN_TTL_ENV
from gasnap.virt import LibvirtHypervisor
from metaservice import MetadataServer, secret_file

NOVA_TOKEN = "n0va-token"
PROJECT = "proj"


@pytest.fixture(scope="module")
def cinder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataServer]:
    base = tmp_path_factory.mktemp("cinder")
    server = MetadataServer(f"sqlite:///{base}/cinder.db", base / "cinder.log").start()
    yield server
    server.stop()


def config(cinder: MetadataServer, base: Path) -> str:
    token = secret_file(base / "cinder.token", cinder.token)
    return f'[cinder]\nurl = "{cinder.url}/v3/{PROJECT}"\ntoken_file = "{token}"\n'


@pytest.fixture(scope="module")
def agent_for_cinder(cinder: MetadataServer, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Agent]:
    base = tmp_path_factory.mktemp("cinder-agent")
    with running_agent(base, config=config(cinder, base), tcp_token=NOVA_TOKEN) as running:
        yield running


def nova_of(agent: Agent) -> Any:
    return nova_client.Client("2.1", session=ks_session.Session(auth=Token(agent.api,
                                                                          NOVA_TOKEN)))


# --- Cinder's side, as its API and remotefs driver act ------------------------------


def cinder_call(cinder: MetadataServer, method: str, path: str, body: Any = None) -> Any:
    answer = requests.request(method, f"{cinder.url}/v3/{PROJECT}{path}", json=body,
                              headers={"X-Auth-Token": cinder.token}, timeout=10)
    assert answer.status_code < 300, answer.text
    return answer.json() if answer.content else None


def cinder_snapshot(cinder: MetadataServer, volume_id: str) -> str:
    made = cinder_call(cinder, "POST", "/snapshots", {"snapshot": {"volume_id": volume_id}})
    return str(made["snapshot"]["id"])


def heard(cinder: MetadataServer, sid: str) -> list[tuple[str, str | None]]:
    snap = cinder_call(cinder, "GET", f"/snapshots/{sid}")["snapshot"]
    return [(u["status"], u["progress"]) for u in snap["updates"]]


def wait_heard(cinder: MetadataServer, sid: str, count: int, timeout: float = 120
               ) -> list[tuple[str, str | None]]:
    """What Cinder heard of SID, once it heard COUNT updates (the remotefs
    driver's wait for 90 %, bounded)."""
    deadline = time.monotonic() + timeout
    while len(updates := heard(cinder, sid)) < count:
        assert time.monotonic() < deadline, f"cinder heard only {updates} of {sid}"
        time.sleep(0.2)
    return updates


def create_info(volume_id: str, sid: str) -> dict[str, Any]:
    return {"snapshot_id": sid, "type": "qcow2", "new_file": f"volume-{volume_id}.{sid}"}


# --- the tests ---------------------------------------------------------------------------


async def test_cinder_hears_each_create_and_delete_as_nova_reports_them(
    agent_for_cinder: Agent, cinder: MetadataServer, hv: LibvirtHypervisor, guest: Domain
) -> None:
    vol = (await hv.get_domain(guest.name)).volumes[1]
    nova = nova_of(agent_for_cinder)
    sid = cinder_snapshot(cinder, vol.volume_id)
    nova.assisted_volume_snapshots.create(vol.volume_id, create_info(vol.volume_id, sid))
    assert wait_heard(cinder, sid, 1) == [("creating", "90%")]
    record = agent_for_cinder.client.get(f"/v1/snapshots/{sid}")
    assert record["status"] == "available"
    assert (await chain_of(hv, guest.name, vol.target))[0] == record["file"]
    # Cinder's driver finishes its part; later its API deletes the snapshot.
    cinder_call(cinder, "POST", f"/snapshots/{sid}/action",
                {"os-reset_status": {"status": "available"}})
    cinder_call(cinder, "DELETE", f"/snapshots/{sid}")
    nova.assisted_volume_snapshots.delete(sid, delete_info={
        "volume_id": vol.volume_id, "type": "qcow2",
        "file_to_merge": Path(record["file"]).name,
        "merge_target_file": Path(record["image"]).name})
    assert wait_heard(cinder, sid, 2) == [("creating", "90%"), ("deleting", "90%")]
    assert record["file"] not in await chain_of(hv, guest.name, vol.target)
    metrics = agent_for_cinder.client.text("/metrics")
    assert 'gasnap_cinder_updates_total{outcome="delivered",status="deleting"} 1.0' in metrics


async def test_an_update_waits_out_a_cinder_outage_and_a_restart(
    cinder: MetadataServer, hv: LibvirtHypervisor, guest: Domain, tmp_path: Path
) -> None:
    """Cinder is away when the create ends: the update waits in the outbox,
    through a restart of the agent, and Cinder hears it once it is back."""
    vol = (await hv.get_domain(guest.name)).volumes[1]
    sid = cinder_snapshot(cinder, vol.volume_id)
    with running_agent(tmp_path, config=config(cinder, tmp_path),
                       tcp_token=NOVA_TOKEN) as agent:
        cinder.stop()
        try:
            nova_of(agent).assisted_volume_snapshots.create(vol.volume_id,
                                                            create_info(vol.volume_id, sid))
            deadline = time.monotonic() + 120
            while "cinder unreachable" not in agent.output():
                assert time.monotonic() < deadline, agent.output()
                await asyncio.sleep(0.2)
            assert agent.client.get(f"/v1/snapshots/{sid}")["status"] == "available"
        finally:
            agent.stop()
            cinder.start()
    assert heard(cinder, sid) == []  # nothing reached it while it was away
    with running_agent(tmp_path, config=config(cinder, tmp_path), tcp_token=NOVA_TOKEN):
        assert wait_heard(cinder, sid, 1) == [("creating", "90%")]


@pytest.mark.parametrize(("point", "expected"), [("create:switched", "creating"),
                                                  ("create:overlays", "error")])
async def test_an_agent_killed_mid_create_still_reports_how_it_ended(
    cinder: MetadataServer, hv: LibvirtHypervisor, guest: Domain, tmp_path: Path,
    point: str, expected: str,
) -> None:
    """The intent is written before the create is accepted: after a SIGKILL
    and a restart, the report follows the record recovery settled."""
    vol = (await hv.get_domain(guest.name)).volumes[1]
    sid = cinder_snapshot(cinder, vol.volume_id)
    agent = Agent(tmp_path, config=config(cinder, tmp_path), tcp_token=NOVA_TOKEN,
                  env={"GASNAP_TEST_FAULT": point})
    try:
        agent.wait_ready()
        nova_of(agent).assisted_volume_snapshots.create(vol.volume_id,
                                                        create_info(vol.volume_id, sid))
        assert agent.wait_exit(120) == -signal.SIGKILL
    finally:
        if agent.proc.poll() is None:
            os.kill(agent.proc.pid, signal.SIGKILL)
    with running_agent(tmp_path, config=config(cinder, tmp_path),
                       tcp_token=NOVA_TOKEN) as again:
        assert wait_heard(cinder, sid, 1) == [(expected, "90%")]
        record = again.client.get(f"/v1/snapshots/{sid}")
        assert record["status"] == ("available" if expected == "creating" else "error")
        if expected == "creating":  # leave the guest's chain as it was
            cinder_call(cinder, "POST", f"/snapshots/{sid}/action",
                        {"os-reset_status": {"status": "available"}})
            task = again.client.request("DELETE", f"/v1/snapshots/{sid}?force=true")
            assert again.client.wait_task(task["task"])["state"] == "succeeded"


def test_the_stand_in_validates_as_cinder_does(cinder: MetadataServer) -> None:
    sid = cinder_snapshot(cinder, "vol-x")
    url = f"{cinder.url}/v3/{PROJECT}/snapshots/{sid}/action"
    auth = {"X-Auth-Token": cinder.token}
    for body in ({"os-update_snapshot_status": {"status": "deleting"}},
                 {"os-update_snapshot_status": {"status": "creating", "progress": "90"}},
                 {"os-update_snapshot_status": {"status": "creating", "progress": "101%"}},
                 {"os-update_snapshot_status": {}}):
        assert requests.post(url, json=body, headers=auth, timeout=10).status_code == 400
    ok = {"os-update_snapshot_status": {"status": "error", "progress": "90%"}}
    assert requests.post(url, json=ok, headers=auth, timeout=10).status_code == 202
    again = {"os-update_snapshot_status": {"status": "creating"}}
    assert requests.post(url, json=again, headers=auth, timeout=10).status_code == 400
    assert heard(cinder, sid) == [("error", "90%")]


async def test_cinders_refusal_is_counted_not_retried(
    agent_for_cinder: Agent, cinder: MetadataServer, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """A snapshot Cinder does not know (404): its word, logged and counted;
    the outbox is not left retrying it."""
    vol = (await hv.get_domain(guest.name)).volumes[1]
    sid = str(uuid.uuid4())  # never made in Cinder
    nova_of(agent_for_cinder).assisted_volume_snapshots.create(
        vol.volume_id, create_info(vol.volume_id, sid))
    deadline = time.monotonic() + 120
    # Whatever the create's outcome (creating or error), Cinder refuses the
    # report of a snapshot it does not know: counted once, never retried.
    while 'gasnap_cinder_updates_total{outcome="refused"' not in \
            agent_for_cinder.client.text("/metrics"):
        assert time.monotonic() < deadline, agent_for_cinder.output()[-2000:]
        await asyncio.sleep(0.2)
    assert f"of snapshot {sid}: Snapshot {sid} could not be found" in agent_for_cinder.output()
    pending = [line for line in agent_for_cinder.client.text("/metrics").splitlines()
               if line.startswith("gasnap_cinder_updates_pending ")]
    deadline = time.monotonic() + 30
    while pending != ["gasnap_cinder_updates_pending 0.0"]:
        assert time.monotonic() < deadline, pending
        await asyncio.sleep(0.5)
        pending = [line for line in agent_for_cinder.client.text("/metrics").splitlines()
                   if line.startswith("gasnap_cinder_updates_pending ")]
    record = agent_for_cinder.client.get(f"/v1/snapshots/{sid}")
    if record["status"] == "available":  # leave the guest's chain as it was
        task = agent_for_cinder.client.request("DELETE", f"/v1/snapshots/{sid}?force=true")
        assert agent_for_cinder.client.wait_task(task["task"])["state"] == "succeeded"


async def test_a_keystone_password_session_reaches_cinder_too(
    hv: LibvirtHypervisor, guest: Domain, tmp_path: Path
) -> None:
    """[cinder] with auth_url, username, password_file and project_name: the
    agent's keystoneauth1 session logs in (the stand-in Keystone's one user)
    and its token carries the report.  The stand-in's tokens expire after
    2 s while claiming an hour (a token revoked): the next report must log
    in again, never be dropped (REVIEW-2 item 11)."""
    vol = (await hv.get_domain(guest.name)).volumes[1]
    cinder = MetadataServer(f"sqlite:///{tmp_path}/cinder.db", tmp_path / "cinder.log",
                            env={TOKEN_TTL_ENV: "2"}).start()
    try:
        password = secret_file(tmp_path / "cinder.password", cinder.token)
        keystone = (f'[cinder]\nurl = "{cinder.url}/v3/{PROJECT}"\n'
                    f'auth_url = "{cinder.url}/v3"\nusername = "gasnap"\n'
                    f'password_file = "{password}"\nproject_name = "service"\n')
        (tmp_path / "agent").mkdir()
        with running_agent(tmp_path / "agent", config=keystone, tcp_token=NOVA_TOKEN) as agent:
            for _ in range(2):
                sid = cinder_snapshot(cinder, vol.volume_id)
                nova_of(agent).assisted_volume_snapshots.create(
                    vol.volume_id, create_info(vol.volume_id, sid))
                assert wait_heard(cinder, sid, 1) == [("creating", "90%")]
                cinder_call(cinder, "POST", f"/snapshots/{sid}/action",
                            {"os-reset_status": {"status": "available"}})
                task = agent.client.request("DELETE", f"/v1/snapshots/{sid}?force=true")
                assert agent.client.wait_task(task["task"])["state"] == "succeeded"
                await asyncio.sleep(3)  # the token the agent holds has expired
            assert 'outcome="refused"' not in agent.client.text("/metrics")
    finally:
        cinder.stop()


def test_the_stand_in_keystones_tokens_expire(tmp_path: Path) -> None:
    cinder = MetadataServer(f"sqlite:///{tmp_path}/cinder.db", tmp_path / "cinder.log",
                            env={TOKEN_TTL_ENV: "1"}).start()
    try:
        assert login(cinder, "nope").status_code == 401
        issued = login(cinder, cinder.token).headers["X-Subject-Token"]
        assert issued != cinder.token
        sid = cinder_snapshot(cinder, str(uuid.uuid4()))
        url = f"{cinder.url}/v3/{PROJECT}/snapshots/{sid}"
        assert requests.get(url, headers={"X-Auth-Token": issued}, timeout=10).ok
        time.sleep(1.5)
        assert requests.get(url, headers={"X-Auth-Token": issued},
                            timeout=10).status_code == 401
    finally:
        cinder.stop()


def login(cinder: MetadataServer, password: str) -> requests.Response:
    return requests.post(f"{cinder.url}/v3/auth/tokens", timeout=10, json={"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "gasnap", "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": "service", "domain": {"name": "Default"}}}}})

