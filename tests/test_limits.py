"""Snapshot limits (gluster's hard limit, soft limit and auto-delete) and
chain-depth limits, on a lab guest with two data disks.

Each test reads where the volumes stand first and sets limits relative to
that, so the tests need no order and leave the limits as they found them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from conftest import (
    PREFIX,
    Agent,
    chain_of,
    create_snapshots,
    freeze_status,
    gasnap,
    volume_files,
    wait_task,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor

DEFAULTS = {"max_snapshots": 256, "soft_limit_percent": 90, "auto_delete": False,
            "max_chain_depth": 64}


@pytest.fixture(scope="module")
async def limited(lab: Lab) -> AsyncIterator[Domain]:
    dom = await lab.up(f"{PREFIX}limits", disks=2, size_mib=32)
    yield dom
    await lab.down(dom.name)


@pytest.fixture
def reset(agent: Agent, limited: Domain) -> Iterator[None]:
    """Every volume of the guest back to the defaults afterwards."""
    yield
    for vol in limited.volumes:
        agent.client.request("PUT", limits_path(vol.volume_id),
                             dict.fromkeys(DEFAULTS))


def limits_path(volume_id: str) -> str:
    return f"/v1/volumes/{volume_id}/limits"


def limits(agent: Agent, volume_id: str, **change: Any) -> dict[str, Any]:
    path = limits_path(volume_id)
    doc: dict[str, Any] = (agent.client.request("PUT", path, change) if change
                           else agent.client.get(path))
    return doc


def refused(agent: Agent, method: str, path: str, body: Any, status: int, code: str) -> str:
    with pytest.raises(ApiError) as err:
        agent.client.request(method, path, body)
    assert (err.value.details["status"], err.value.code) == (status, code), err.value
    return str(err.value)


def records(agent: Agent, volume_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = agent.client.get(
        f"/v1/snapshots?volume_id={volume_id}")["snapshots"]
    return found


def metric(agent: Agent, name: str, volume_id: str) -> float | None:
    for line in agent.client.text("/metrics").splitlines():
        if line.startswith(f'{name}{{volume_id="{volume_id}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def written(hv: LibvirtHypervisor, dom: Domain, tag: str) -> None:
    """A file the guest writes on each disk before a snapshot."""
    await sh(hv, dom.name, f"echo {tag} > /data/{tag} && echo {tag} > /data1/{tag} && sync")


def take(agent: Agent, dom: Domain, name: str, targets: list[str] | None = None,
         *, force: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"domains": [dom.name], "name": name, "force": force}
    if targets is not None:
        body["disks"] = {dom.name: targets}
    task = create_snapshots(agent, body)
    assert task["state"] == "succeeded", task
    return task


# --- the API ----------------------------------------------------------------------


@pytest.mark.usefixtures("reset")
async def test_limits_are_read_set_and_cleared(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    volume = limited.volumes[0].volume_id
    start = limits(agent, volume)
    assert {k: start[k] for k in DEFAULTS} == DEFAULTS
    assert start["own"] == []
    assert (start["soft_snapshots"], start["soft_chain_depth"]) == (230, 57)
    assert start["chain_depth"] == len(await chain_of(hv, limited.name, "vda"))
    assert start["snapshots"] == len([r for r in records(agent, volume)
                                      if r["status"] != "error"])

    assert limits(agent, volume, max_snapshots=10)["max_snapshots"] == 10
    both = limits(agent, volume, auto_delete=True, soft_limit_percent=50)
    assert (both["max_snapshots"], both["auto_delete"], both["soft_snapshots"]) == (10, True, 5)
    assert sorted(both["own"]) == ["auto_delete", "max_snapshots", "soft_limit_percent"]
    # The other volume of the same guest keeps the defaults.
    assert limits(agent, limited.volumes[1].volume_id)["own"] == []

    # Bad input: a specific error, nothing changed.
    path = limits_path(volume)
    for body in ({"max_snapshots": 0}, {"soft_limit_percent": 101}, {"auto_delete": "yes"},
                 {"max_chain_depth": 1}, {"max_snapshots": 2.5}, {"bogus": 1}):
        refused(agent, "PUT", path, body, 400, "invalid_limits")
    refused(agent, "PUT", limits_path("no-such-volume"), {"max_snapshots": 3}, 404,
            "volume_not_found")
    refused(agent, "GET", limits_path("no-such-volume"), None, 404, "volume_not_found")
    assert limits(agent, volume) == both

    # null: back to the default.
    cleared = limits(agent, volume, max_snapshots=None)
    assert (cleared["max_snapshots"], cleared["own"]) == (256, ["soft_limit_percent",
                                                                "auto_delete"])


@pytest.mark.usefixtures("reset")
def test_the_cli_shows_and_changes_limits(agent: Agent, limited: Domain) -> None:
    volume = limited.volumes[1].volume_id
    api = ["--api", agent.api]
    out = gasnap(*api, "volume", "limits", volume, "--max", "12", "--soft", "75",
                 "--auto-delete", "on", "--max-depth", "20").stdout
    assert "max_snapshots       12      (this volume)" in out
    assert "auto_delete         on      (this volume)" in out
    assert "(soft limit 9)" in out and "(soft limit 15)" in out
    doc = json.loads(gasnap(*api, "volume", "limits", volume, "--max", "default",
                            "--json").stdout)
    assert (doc["max_snapshots"], doc["soft_limit_percent"], doc["max_chain_depth"]) == \
        (256, 75, 20)
    failed = gasnap(*api, "volume", "limits", volume, "--soft", "0", check=False)
    assert failed.returncode == 1 and "soft_limit_percent must be" in failed.stderr
    bad_flag = gasnap(*api, "volume", "limits", volume, "--max", "lots", check=False)
    assert bad_flag.returncode == 2


# --- hard limits ----------------------------------------------------------------------


@pytest.mark.usefixtures("reset")
async def test_a_create_past_max_snapshots_is_refused_for_the_whole_group(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    vda, vdb = (v.volume_id for v in limited.volumes)
    limits(agent, vda, max_snapshots=limits(agent, vda)["snapshots"] + 1)
    await written(hv, limited, "hard1")
    take(agent, limited, "hard-1")  # vda reaches its limit

    before = {t: await chain_of(hv, limited.name, t) for t in ("vda", "vdb")}
    files = {v.volume_id: volume_files(v.active_file) for v in limited.volumes}
    recs = {v: records(agent, v) for v in (vda, vdb)}
    message = refused(agent, "POST", "/v1/snapshots", {"domains": [limited.name],
                                                       "name": "hard-2"}, 409,
                      "snapshot_limit")
    assert f"(volume {vda})" in message and "max_snapshots" in message
    assert f"(volume {vdb})" not in message
    # Nothing changed on either disk, nor in the records; the guest runs thawed.
    assert {t: await chain_of(hv, limited.name, t) for t in ("vda", "vdb")} == before
    assert {v.volume_id: volume_files(v.active_file) for v in limited.volumes} == files
    assert {v: records(agent, v) for v in (vda, vdb)} == recs
    assert await freeze_status(hv, limited.name) == "thawed"
    # The limit is the volume's: vdb alone still takes snapshots.
    take(agent, limited, "hard-vdb", ["vdb"])
    # Raised again (back to the default): vda takes snapshots again.
    limits(agent, vda, max_snapshots=None)
    take(agent, limited, "hard-3", ["vda"])


@pytest.mark.usefixtures("reset")
async def test_max_chain_depth_bounds_the_chain(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    vdb = limited.volumes[1].volume_id
    depth = len(await chain_of(hv, limited.name, "vdb"))
    doc = limits(agent, vdb, max_chain_depth=depth + 1, soft_limit_percent=100)
    assert doc["chain_depth"] == depth
    take(agent, limited, "deep-1", ["vdb"])
    chain = await chain_of(hv, limited.name, "vdb")
    assert len(chain) == depth + 1
    message = refused(agent, "POST", "/v1/snapshots",
                      {"domains": [limited.name], "disks": {limited.name: ["vdb"]}}, 409,
                      "snapshot_limit")
    assert "max_chain_depth" in message
    assert await chain_of(hv, limited.name, "vdb") == chain


# --- soft limits and auto-delete ------------------------------------------------------


@pytest.mark.usefixtures("reset")
async def test_past_the_soft_limit_warnings_then_auto_delete_merges_the_oldest(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    vda = limited.volumes[0].volume_id
    count = limits(agent, vda)["snapshots"]
    # max 2(count+2) at 50 %: the soft limit is count + 2 snapshots.
    doc = limits(agent, vda, max_snapshots=2 * (count + 2), soft_limit_percent=50)
    assert doc["soft_snapshots"] == count + 2
    results, results_ids = [], []
    for n in range(3):
        await written(hv, limited, f"soft{n}")
        done = take(agent, limited, f"soft-{n}", ["vda"])
        results.append(done["result"])
        results_ids.append(done["id"])
    assert "warnings" not in results[1]
    assert any(vda in w and "soft limit" in w for w in results[2]["warnings"]), results[2]
    assert results[2]["deleted"] == []  # auto_delete is off: nothing merged
    shown = gasnap("--api", agent.api, "task", "show", results_ids[2]).stdout
    assert "warning: " in shown and "soft limit" in shown
    assert metric(agent, "gasnap_volume_snapshots", vda) == count + 3
    assert metric(agent, "gasnap_volume_snapshot_limit", vda) == 2 * (count + 2)

    # auto_delete: the next create brings the volume back to its soft limit,
    # merging the oldest snapshots through the normal delete.
    limits(agent, vda, auto_delete=True)
    oldest = [r["id"] for r in records(agent, vda) if r["status"] == "available"][:2]
    await written(hv, limited, "soft3")
    result = take(agent, limited, "soft-3", ["vda"])["result"]
    new = result["snapshots"][0]["id"]
    assert result["deleted"] == oldest
    left = records(agent, vda)
    assert len(left) == count + 2 and new in {r["id"] for r in left}
    assert not {r["id"] for r in left} & set(oldest)
    assert metric(agent, "gasnap_volume_snapshots", vda) == count + 2
    # Every record still matches the live chain; the guest's files are whole.
    chain = await chain_of(hv, limited.name, "vda")
    for rec in left:
        assert rec["file"] in chain and rec["image"] in chain, rec
    assert (await sh(hv, limited.name, "cat /data/soft0 /data/soft3")).split() == \
        ["soft0", "soft3"]


@pytest.mark.usefixtures("reset")
async def test_auto_delete_keeps_a_snapshot_a_linked_clone_holds(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    vdb = limited.volumes[1].volume_id
    take(agent, limited, "held-a", ["vdb"])
    take(agent, limited, "held-b", ["vdb"])
    ids = [r["id"] for r in records(agent, vdb) if r["status"] == "available"]
    count = limits(agent, vdb)["snapshots"]
    assert count == len(ids) >= 2
    task = agent.client.request("POST", f"/v1/snapshots/{ids[0]}/clone", {"mode": "linked"})
    clone = wait_task(agent, task["task"]["id"])
    assert clone["state"] == "succeeded", clone
    clone_id = clone["result"]["clone"]["id"]
    try:
        # A soft limit one below the count: the next create is two over it.
        percent = -(-100 * (count - 1) // (count + 1))
        doc = limits(agent, vdb, max_snapshots=count + 1, soft_limit_percent=percent,
                     auto_delete=True)
        assert doc["soft_snapshots"] == count - 1
        result = take(agent, limited, "held-c", ["vdb"])["result"]
        # The oldest is the clone's: the two after it go instead.
        assert result["deleted"] == ids[1:3]
        left = {r["id"] for r in records(agent, vdb)}
        assert ids[0] in left and not left & set(ids[1:3])
        if count == 2:  # nothing else may go: said, not failed
            assert any("held by linked clones" in w for w in result["warnings"]), result
        else:
            assert len(left) == count - 1
        chain = await chain_of(hv, limited.name, "vdb")
        for rec in records(agent, vdb):
            assert rec["file"] in chain and rec["image"] in chain, rec
    finally:
        done = wait_task(agent, agent.client.request("DELETE", f"/v1/clones/{clone_id}")
                         ["task"]["id"])
        assert done["state"] == "succeeded", done


@pytest.mark.usefixtures("reset")
async def test_auto_delete_never_merges_what_nova_asked_for(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    """REVIEW-2 item 6: Cinder keeps the records of the snapshots it asked
    Nova for and deletes them itself; auto-delete passes over them (the
    oldest here) and merges gasnap's own instead."""
    vdb = limited.volumes[1]
    sid = str(uuid.uuid4())
    new_file = f"volume-{vdb.volume_id}.{sid}"
    agent.client.request("POST", "/os-assisted-volume-snapshots", {"snapshot": {
        "volume_id": vdb.volume_id,
        "create_info": {"snapshot_id": sid, "type": "qcow2", "new_file": new_file}}})
    await wait_until(lambda: _available(agent, sid), timeout=120)
    # A volume Cinder keeps snapshots of: gasnap's own create is refused
    # unless forced (its active file would change behind Cinder's back).
    message = refused(agent, "POST", "/v1/snapshots",
                      {"domains": [limited.name], "disks": {limited.name: ["vdb"]}}, 409,
                      "cinder_volume")
    assert sid in message
    take(agent, limited, "own-a", ["vdb"], force=True)
    take(agent, limited, "own-b", ["vdb"], force=True)
    ours = {r["id"] for r in records(agent, vdb.volume_id)
            if r["status"] == "available" and r["id"] != sid and r["origin"] != "managed"}
    count = limits(agent, vdb.volume_id)["snapshots"]
    # A soft limit of one: everything may go but the create's own, so the
    # Nova snapshot stays only because it is not auto-delete's to merge.
    doc = limits(agent, vdb.volume_id, max_snapshots=count + 1,
                 soft_limit_percent=-(-100 // (count + 1)), auto_delete=True)
    assert doc["soft_snapshots"] == 1, doc
    try:
        result = take(agent, limited, "own-c", ["vdb"], force=True)["result"]
        left = {r["id"] for r in records(agent, vdb.volume_id)}
        assert sid in left, result
        assert set(result["deleted"]) == ours, result
        chain = await chain_of(hv, limited.name, "vdb")
        for rec in records(agent, vdb.volume_id):
            assert rec["file"] in chain and rec["image"] in chain, rec
    finally:  # the volume is gasnap's alone again for the other tests
        # Cinder's snapshot: gasnap's own delete needs force (the operator's word)
        done = wait_task(agent, agent.client.request(
            "DELETE", f"/v1/snapshots/{sid}?force=true")["task"]["id"])
        assert done["state"] == "succeeded", done


async def _available(agent: Agent, snapshot_id: str) -> bool:
    try:
        return bool(agent.client.get(f"/v1/snapshots/{snapshot_id}")["status"] == "available")
    except ApiError:
        return False


@pytest.mark.usefixtures("reset")
async def test_a_revert_keeps_to_the_limit_of_the_state_it_keeps(
    agent: Agent, hv: LibvirtHypervisor, limited: Domain
) -> None:
    """A revert keeps the state it leaves as snapshots: at the hard limit it
    is refused before the domain is touched (forced or not)."""
    vda = limited.volumes[0].volume_id
    target = take(agent, limited, "revert-to", ["vda"])["result"]["snapshots"][0]
    limits(agent, vda, max_snapshots=limits(agent, vda)["snapshots"])
    chain = await chain_of(hv, limited.name, "vda")
    message = refused(agent, "POST", f"/v1/snapshots/{target['id']}/revert",
                      {"scope": "volume", "force": True}, 409, "snapshot_limit")
    assert f"(volume {vda})" in message
    assert (await hv.get_domain(limited.name)).state.value == "running"
    assert await chain_of(hv, limited.name, "vda") == chain
