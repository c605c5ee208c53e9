"""P9: clones, against their size and against a bare qemu-img in the same run.

A linked clone writes a qcow2 header and nothing else, so its latency must
not depend on the virtual size: a clone of a 1 TiB disk's snapshot against
one of a 1 GiB disk's.  A full clone is ``qemu-img convert`` with the
formats named: set against a bare ``qemu-img convert`` of the same image to
the same directory, interleaved, measured through the API (a client already
running, as Nova's would be) so the figure is the agent's work and not the
CLI's start-up.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .. import qemuimg
from ..client import ApiClient
from ..lab.guests import Lab
from ..virt import LibvirtHypervisor
from .cases import order
from .rig import URI, Agent, guests, settle, settled_figure, timed, timed_task
from .stats import Comparison, Figure

# The full clone's source: this much random data, all allocated.  Large
# enough that the request's fixed cost (plan, records, journal) does not
# stand for the copy: 1 GiB copies in about 0.3 s here.
FULL_MIB = 4096


async def clones(hv: LibvirtHypervisor, agent: Agent, runs: int, scratch: Path
                 ) -> list[Comparison | Figure]:
    linked = Comparison("P9", "linked clone latency, 1 TiB vs 1 GiB virtual disk", "s",
                        "1 TiB disk", "1 GiB disk", "<= 1.1x")
    full = Comparison("P9", f"full clone of {FULL_MIB} MiB of data (throughput)", "s",
                      "gasnap full clone (API)", "qemu-img convert -t writeback", ">= 0.95x",
                      higher_is_better=True,
                      note="both flush the copy to disk before they end; an even number "
                           "of interleaved runs, since on this host every second 4 GiB "
                           "write in a row is the slow one, whoever makes it")
    async with guests(hv, ["gb-clone"]) as (name,):
        await _cold_plug(hv, name, scratch)
        snaps = await _snapshots(agent, name)
        settles = [await settle()]
        for i in range(runs):
            for which in order(i):
                target = "vdy" if which == "a" else "vdx"
                task, seconds = await timed_task(agent.cli(
                    "snapshot", "clone", snaps[target]["id"], "--json"))
                (linked.a if which == "a" else linked.b).append(seconds)
                await _delete_clone(agent, task["result"]["clone"]["id"])
        image, fmt = snaps["vdz"]["image"], "qcow2"
        client = ApiClient(agent.api)
        # Untimed: the first copy reads the source from disk, the rest from
        # the page cache; neither side gets that first one.
        await asyncio.to_thread(_full_clone, client, snaps["vdz"]["id"])
        for i in range(runs):
            for which in order(i):
                # Each copy starts with no dirty pages of the one before:
                # 4 GiB of writeback would land on whichever ran next.
                await asyncio.to_thread(os.sync)
                settles.append(await settle())
                if which == "a":
                    seconds = await asyncio.to_thread(_full_clone, client, snaps["vdz"]["id"])
                else:
                    dest = Path(image).with_name(f"bare-{uuid.uuid4()}")
                    seconds = await timed(["qemu-img", "convert", "-t", "writeback", "-f",
                                           fmt, "-O", "qcow2", image, str(dest)])
                    dest.unlink()
                (full.a if which == "a" else full.b).append(seconds)
    return [linked, full, settled_figure("P9", settles)]


async def _cold_plug(hv: LibvirtHypervisor, name: str, scratch: Path) -> None:
    """Blank 1 GiB (vdx) and 1 TiB (vdy) disks and one holding FULL_MIB of
    random data (vdz), plugged into the definition while the guest is off."""
    directory = Path((await hv.get_domain(name)).volumes[0].active_file).parent
    virsh = ["virsh", "-q", "-c", URI]
    await timed([*virsh, "destroy", name])
    raw = scratch / "random.raw"
    await asyncio.to_thread(_random_file, raw, FULL_MIB << 20)
    for target, size in (("vdx", "1G"), ("vdy", "1T"), ("vdz", None)):
        serial = str(uuid.uuid4())
        path = directory / f"volume-{serial}"
        if size is None:
            await qemuimg.run("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
        else:
            await qemuimg.run("create", "-q", "-f", "qcow2", str(path), size)
        await timed([*virsh, "attach-disk", name, str(path), target, "--driver", "qemu",
                     "--subdriver", "qcow2", "--serial", serial, "--targetbus", "virtio",
                     "--config"])
    raw.unlink()
    await timed([*virsh, "start", name])
    await Lab(hv).wait_for_agent(name, 120)


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for _ in range(size >> 20):
            out.write(os.urandom(1 << 20))


async def _snapshots(agent: Agent, name: str) -> dict[str, dict[str, Any]]:
    task, _ = await timed_task(agent.cli("snapshot", "create", name, "--disk", "vdx",
                                         "--disk", "vdy", "--disk", "vdz", "--json"))
    return {s["target"]: s for s in task["result"]["snapshots"]}


async def _delete_clone(agent: Agent, clone_id: str) -> None:
    await timed_task(agent.cli("clone", "delete", clone_id, "--json"))


def _full_clone(client: ApiClient, snapshot_id: str) -> float:
    """Seconds from the request to the task's end; the clone deleted after."""
    started = time.monotonic()
    task = client.request("POST", f"/v1/snapshots/{snapshot_id}/clone", {"mode": "full"})
    done = client.wait_task(task["task"])
    seconds = time.monotonic() - started
    if done["state"] != "succeeded":
        raise RuntimeError(f"full clone failed: {done}")
    made = client.request("DELETE", f"/v1/clones/{done['result']['clone']['id']}")
    client.wait_task(made["task"])
    return seconds
