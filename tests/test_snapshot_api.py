"""The snapshot API and CLI as callers see them: bad input is refused with a
specific JSON error and changes nothing; records, rename, tasks."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import pytest

from conftest import Agent, chain_of, create_snapshots, gasnap, volume_files, wait_task
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor


async def state(agent: Agent, hv: LibvirtHypervisor, guest: Domain) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    return {
        "chains": {v.target: await chain_of(hv, guest.name, v.target) for v in guest.volumes},
        "files": {v.target: volume_files(v.active_file) for v in guest.volumes},
        "records": agent.client.get("/v1/snapshots")["snapshots"],
    }


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"domains": ["gt-no-such-domain"]}, 404, "domain_not_found"),
        ({"domains": ["GUEST"], "disks": {"GUEST": ["vdz"]}}, 404, "volume_not_found"),
        ({"domains": ["GUEST"], "name": "bad\nname"}, 400, "invalid_name"),
        ({"domains": ["GUEST"], "name": "x" * 256}, 400, "invalid_name"),
        ({"domains": ["GUEST"], "quiesce": "sometimes"}, 400, "invalid_request"),
        ({"domains": []}, 400, "invalid_request"),
        ({"domains": "GUEST"}, 400, "invalid_request"),
        ({"domains": ["GUEST", "GUEST"]}, 400, "invalid_request"),
        ({"domains": ["GUEST"], "disks": {"other": ["vda"]}}, 400, "invalid_request"),
        ({"domains": ["GUEST"], "colour": "blue"}, 400, "invalid_request"),
    ],
)
async def test_bad_create_requests_change_nothing(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain,
    body: dict[str, Any], status: int, code: str,
) -> None:
    body = json.loads(json.dumps(body).replace("GUEST", guest.name))
    before = await state(agent, hv, guest)
    with pytest.raises(ApiError) as info:
        agent.client.request("POST", "/v1/snapshots", body)
    assert (info.value.details["status"], info.value.code) == (status, code)
    assert info.value.message
    assert await state(agent, hv, guest) == before


def test_malformed_json_is_a_400(agent: Agent) -> None:
    # http.client, not gasnap's own client: an independent HTTP implementation.
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(agent.api.removeprefix("unix:"))
    conn.request("POST", "/v1/snapshots", body=b"{not json",
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"]["code"] == "invalid_json"
    conn.close()


async def test_a_busy_volume_is_a_409(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain
) -> None:
    before = agent.client.get("/v1/snapshots")["snapshots"]
    await sh(hv, guest.name, "echo 3 > /run/gasnap-hook-delay")
    first = agent.client.request("POST", "/v1/snapshots", {"domains": [guest.name]})["task"]
    try:
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots",
                                 {"domains": [guest.name], "disks": {guest.name: ["vdb"]}})
        assert (info.value.details["status"], info.value.code) == (409, "volume_busy")
        assert first["id"] in info.value.message
    finally:
        done = wait_task(agent, first["id"])
        await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
    assert done["state"] == "succeeded", done
    # The refused request recorded nothing: only the first task's snapshots are new.
    after = agent.client.get("/v1/snapshots")["snapshots"]
    assert after == before + done["result"]["snapshots"]
    # Released once the task ended.
    assert create_snapshots(agent, {"domains": [guest.name]})["state"] == "succeeded"


def test_unknown_ids_are_404(agent: Agent) -> None:
    for path, code in (("/v1/snapshots/nope", "snapshot_not_found"),
                       ("/v1/tasks/nope", "task_not_found")):
        with pytest.raises(ApiError) as info:
            agent.client.get(path)
        assert (info.value.details["status"], info.value.code) == (404, code)
    with pytest.raises(ApiError) as info:
        agent.client.get("/v1/snapshots?status=fine")
    assert info.value.details["status"] == 400


async def test_records_filters_and_rename(agent: Agent, guest: Domain) -> None:
    task = create_snapshots(agent, {"domains": [guest.name], "disks": {guest.name: ["vda"]},
                                    "name": "before", "description": "d1"})
    (snap,) = task["result"]["snapshots"]
    assert set(snap) == {"id", "name", "description", "domain", "volume_id", "target",
                         "status", "consistency", "file", "image", "parent", "group_id",
                         "created_at", "size", "error", "schedule", "origin",
                         "domain_state", "memory_file", "memory_size"}
    assert snap["size"] == 64 * 1024 * 1024
    by_volume = agent.client.get(f"/v1/snapshots?volume_id={snap['volume_id']}")["snapshots"]
    assert by_volume[-1] == snap
    assert all(r["volume_id"] == snap["volume_id"] for r in by_volume)
    assert all(r["status"] == "error" for r in
               agent.client.get("/v1/snapshots?status=error")["snapshots"])
    renamed = agent.client.request("PATCH", f"/v1/snapshots/{snap['id']}", {"name": "after"})
    assert (renamed["name"], renamed["description"]) == ("after", "d1")
    assert {k: v for k, v in renamed.items() if k != "name"} == \
        {k: v for k, v in snap.items() if k != "name"}
    for bad in ({"status": "error"}, {"name": "a\x00b"}):
        with pytest.raises(ApiError) as info:
            agent.client.request("PATCH", f"/v1/snapshots/{snap['id']}", bad)
        assert info.value.details["status"] == 400
    assert agent.client.get(f"/v1/snapshots/{snap['id']}")["name"] == "after"


async def test_cli_snapshots_and_tasks(agent: Agent, guest: Domain) -> None:
    api = ["--api", agent.api]
    queued = json.loads(gasnap(*api, "snapshot", "create", guest.name, "--disk", "vdb",
                               "--no-wait", "--json").stdout)
    assert queued["state"] in ("queued", "running", "succeeded")
    done = json.loads(gasnap(*api, "task", "wait", queued["id"], "--json").stdout)
    assert done["state"] == "succeeded"
    (snap,) = done["result"]["snapshots"]
    assert json.loads(gasnap(*api, "task", "show", queued["id"], "--json").stdout) == done
    assert queued["id"] in [t["id"] for t in
                            json.loads(gasnap(*api, "task", "list", "--json").stdout)]
    info = json.loads(gasnap(*api, "snapshot", "info", snap["id"], "--json").stdout)
    assert info == snap
    listed = json.loads(gasnap(*api, "snapshot", "list", "--domain", guest.name,
                               "--volume", snap["volume_id"], "--json").stdout)
    assert listed[-1] == snap
    renamed = json.loads(gasnap(*api, "snapshot", "rename", snap["id"], "nightly-1",
                                "--json").stdout)
    assert renamed["name"] == "nightly-1"
    table = gasnap(*api, "snapshot", "list", "--domain", guest.name).stdout
    assert "nightly-1" in table and snap["id"] in table
    failed = gasnap(*api, "snapshot", "create", "gt-no-such-domain", check=False)
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "gt-no-such-domain" in failed.stderr


async def test_listing_in_pages(agent: Agent, guest: Domain) -> None:
    for _ in range(3):
        assert create_snapshots(agent, {"domains": [guest.name], "disks": {
            guest.name: ["vda"]}, "quiesce": "off"})["state"] == "succeeded"
    everything = agent.client.get(f"/v1/snapshots?domain={guest.name}")
    assert "next_marker" not in everything
    walked, marker = [], ""
    while True:
        page = agent.client.get(f"/v1/snapshots?domain={guest.name}&limit=2{marker}")
        assert len(page["snapshots"]) <= 2
        walked += page["snapshots"]
        if "next_marker" not in page:
            break
        assert page["next_marker"] == page["snapshots"][-1]["id"]
        marker = f"&marker={page['next_marker']}"
    assert walked == everything["snapshots"]  # same records, order and parents
    for query, code in (("limit=0", "invalid_limit"), ("limit=1001", "invalid_limit"),
                        ("limit=two", "invalid_limit"), ("marker=nope", "invalid_marker")):
        with pytest.raises(ApiError) as info:
            agent.client.get(f"/v1/snapshots?{query}")
        assert (info.value.details["status"], info.value.code) == (400, code)
