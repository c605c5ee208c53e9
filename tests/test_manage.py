"""Manage and unmanage (Cinder's manage_existing_snapshot) on a lab guest:
layers virsh made are listed, adopted, deleted through gasnap with the
guest's data intact; a record is forgotten with every file and the chain
as they were, and adopted again."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
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
    image_digest,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.metadata import Consistency, Finalization, NewSnapshot, Status
from gasnap.metastore import open_sqlite
from gasnap.virt import LibvirtHypervisor


@pytest.fixture(scope="module")
async def managed(lab: Lab) -> AsyncIterator[Domain]:
    dom = await lab.up(f"{PREFIX}manage", disks=1, size_mib=32)
    yield dom
    await lab.down(dom.name)


def refused(agent: Agent, method: str, path: str, body: Any, status: int, code: str) -> None:
    with pytest.raises(ApiError) as err:
        agent.client.request(method, path, body)
    assert (err.value.details["status"], err.value.code) == (status, code), err.value


async def virsh_snapshot(hv: LibvirtHypervisor, name: str, tag: str) -> None:
    """A disk-only external snapshot the way an operator makes one by hand."""
    await sh(hv, name, f"echo {tag} > /data/{tag} && sync")
    subprocess.run(["virsh", "-q", "-c", URI, "snapshot-create-as", name, tag, "--disk-only",
                    "--no-metadata", "--atomic"], check=True, capture_output=True)


def manage(agent: Agent, volume: str, file: str, name: str = "") -> dict[str, Any]:
    record: dict[str, Any] = agent.client.request(
        "POST", "/v1/snapshots/manage", {"volume_id": volume, "ref": {"file": file},
                                         "name": name})
    return record


async def test_layers_made_elsewhere_are_adopted_and_forgotten(
    agent: Agent, hv: LibvirtHypervisor, managed: Domain
) -> None:
    name, volume = managed.name, managed.volumes[0].volume_id
    await virsh_snapshot(hv, name, "m1")
    await virsh_snapshot(hv, name, "m2")
    active, middle, base = await chain_of(hv, name, "vda")
    layers = agent.client.get(f"/v1/volumes/{volume}/manageable")
    assert [(x["reference"]["file"], x["backing"], x["safe_to_manage"]) for x in layers] == [
        (os.path.basename(active), os.path.basename(middle), True),
        (os.path.basename(middle), os.path.basename(base), True),
        (os.path.basename(base), None, False)]
    assert layers[2]["reason_not_safe"]

    # Bad references change nothing.
    for ref, status, code in (("../etc", 400, "invalid_reference"),
                              ("no-such-layer", 400, "invalid_reference"),
                              (os.path.basename(base), 400, "invalid_reference")):
        refused(agent, "POST", "/v1/snapshots/manage",
                {"volume_id": volume, "ref": {"file": ref}}, status, code)
    refused(agent, "POST", "/v1/snapshots/manage",
            {"volume_id": "no-such-volume", "ref": {"file": "x"}}, 404, "volume_not_found")
    assert agent.client.get(f"/v1/snapshots?volume_id={volume}")["snapshots"] == []

    first = manage(agent, volume, os.path.basename(middle), "by-virsh-1")
    assert (first["origin"], first["consistency"], first["status"]) == (
        "managed", "unknown", "available")
    assert (first["file"], first["image"], first["size"]) == (middle, base, 32 << 20)
    refused(agent, "POST", "/v1/snapshots/manage",
            {"volume_id": volume, "ref": {"file": os.path.basename(middle)}}, 409,
            "already_managed")
    out = gasnap("--api", agent.api, "snapshot", "manage", volume, os.path.basename(active),
                 "--name", "by-virsh-2", "--json")
    second = json.loads(out.stdout)
    assert (second["file"], second["image"], second["parent"]) == (active, middle, first["id"])
    listed = json.loads(gasnap("--api", agent.api, "snapshot", "manageable", volume,
                               "--json").stdout)
    assert [x["snapshot_id"] for x in listed] == [second["id"], first["id"], None]

    # Unmanage: the record goes, files and chain stay byte for byte.
    digests = {p: image_digest(p, "qcow2") for p in (middle, base)}
    gasnap("--api", agent.api, "snapshot", "unmanage", second["id"])
    refused(agent, "GET", f"/v1/snapshots/{second['id']}", None, 404, "snapshot_not_found")
    assert await chain_of(hv, name, "vda") == [active, middle, base]
    assert {p: image_digest(p, "qcow2") for p in (middle, base)} == digests
    again = manage(agent, volume, os.path.basename(active), "again")
    assert again["id"] != second["id"] and again["parent"] == first["id"]

    # A managed snapshot deletes like any other: the guest's data stays.
    task = delete_snapshot(agent, first["id"])
    assert task["state"] == "succeeded", task.get("error")
    assert (await sh(hv, name, "cat /data/m1 /data/m2")).split() == ["m1", "m2"]
    assert middle not in await chain_of(hv, name, "vda")
    task = delete_snapshot(agent, again["id"])
    assert task["state"] == "succeeded", task.get("error")
    assert (await sh(hv, name, "cat /data/m1 /data/m2")).split() == ["m1", "m2"]


async def test_unmanage_clears_an_error_record_of_a_domain_that_is_gone(agent: Agent) -> None:
    store = await open_sqlite(agent.state_dir / "metadata.db")
    await store.create_snapshot_metadata(NewSnapshot(
        "orphan-1", "vol-orphan", "n", "", 1, "2026-01-01T00:00:00Z", f"{PREFIX}long-gone",
        target="vda"))
    await store.finalize_snapshot_metadata("orphan-1", Finalization(
        Status.ERROR, None, None, Consistency.CRASH, "its domain was undefined"))
    await store.update_snapshot_metadata("orphan-1", "orphan", None)
    await store.close()
    agent.client.request("POST", "/v1/snapshots/orphan-1/unmanage", {})
    refused(agent, "GET", "/v1/snapshots/orphan-1", None, 404, "snapshot_not_found")
    refused(agent, "POST", "/v1/snapshots/orphan-1/unmanage", {}, 404, "snapshot_not_found")


async def test_a_layer_named_by_another_tool_never_makes_names_grow(
    agent: Agent, hv: LibvirtHypervisor, managed: Domain
) -> None:
    """virsh names the active file (230 characters here): gasnap's next
    overlay is still volume-<volume_id>.<snapshot_id> (its name built from
    the active file's would pass NAME_MAX)."""
    name, volume = managed.name, managed.volumes[0].volume_id
    active = (await chain_of(hv, name, "vda"))[0]
    long = os.path.join(os.path.dirname(active), "x" * 230 + ".virsh1")
    await sh(hv, name, "echo long > /data/long && sync")
    subprocess.run(["virsh", "-q", "-c", URI, "snapshot-create-as", name, "long", "--disk-only",
                    "--no-metadata", "--atomic", "--diskspec", f"vda,file={long}"],
                   check=True, capture_output=True)
    assert (await chain_of(hv, name, "vda"))[0] == long
    task = create_snapshots(agent, {"domains": [name], "name": "after-virsh"})
    assert task["state"] == "succeeded", task
    record = task["result"]["snapshots"][0]
    assert os.path.basename(record["file"]) == f"volume-{volume}.{record['id']}"
    assert record["image"] == long
    assert delete_snapshot(agent, record["id"])["state"] == "succeeded"
    assert (await sh(hv, name, "cat /data/long")).strip() == "long"
