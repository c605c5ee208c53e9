"""``gasnap demo``: the README's first command, end to end on a lab guest.

Boots a lab guest with two data disks, starts an fsync'd write workload in
it, takes one quiesced group snapshot of both disks through the same
workflow the agent runs, deletes one of them again by a live merge (the
guest's data checked across it), checks each remaining point-in-time image
with ``e2fsck -fn`` and reads the freeze window from the guest's own
fsfreeze-hook log.

Each run starts from a new guest and an empty state: a demo run again and
again must not pile its snapshots onto one chain (it did, and reached
``max_chain_depth`` after 63 runs).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import GasnapError
from .hypervisor import Domain
from .lab.guests import Lab
from .lab.verify import fsck_snapshot
from .lab.workload import freeze_log, sh, start_load, stop_load
from .quiesce import Quiesce
from .runtime import Runtime, open_runtime
from .virt import LibvirtHypervisor
from .workflows.createplan import CreateRequest
from .workflows.deleteplan import Strategy

DEMO_GUEST = "gasnap-demo"
DEMO_STATE = Path("/var/lib/gasnap/demo")


class DemoFailed(GasnapError):
    code = "demo_failed"


async def _snapshot(runtime: Runtime) -> dict[str, Any]:
    service = runtime.service
    await asyncio.wait_for(service.ready.wait(), 60)
    task = await service.create(CreateRequest(
        domains=[DEMO_GUEST], disks={}, name="demo", description="gasnap demo",
        quiesce=Quiesce.REQUIRED,
    ))
    await service.tasks.wait(task.id, 120)
    record = task.to_record()
    if record["state"] != "succeeded":
        raise DemoFailed(f"snapshot failed: {record.get('error')}")
    return record


async def _delete(runtime: Runtime, snapshot_id: str) -> dict[str, Any]:
    service = runtime.service
    task = await service.delete(snapshot_id, Strategy.AUTO)
    await service.tasks.wait(task.id, 300)
    record = task.to_record()
    if record["state"] != "succeeded":
        raise DemoFailed(f"delete failed: {record.get('error')}")
    return record


async def _fsck(snapshots: list[dict[str, Any]], say: Callable[..., None]
                ) -> list[dict[str, Any]]:
    checks = []
    for snap in snapshots:
        result = await fsck_snapshot(snap)
        checks.append({"snapshot": snap["id"], "image": snap["image"],
                       "e2fsck_exit": result.exitcode,
                       "journal_recovery": result.needs_journal_recovery})
        verdict = "clean" if result.clean else "NOT clean"
        say(f"   {snap['target']}: {Path(snap['image']).name}: {verdict} "
            f"(exit {result.exitcode})")
    return checks


async def _boot(uri: str) -> Domain:
    # The lab defines and boots domains, which the agent's hypervisor
    # interface never does: it has its own libvirt connection.
    lab_hv = LibvirtHypervisor(uri)
    try:
        return await Lab(lab_hv).up(DEMO_GUEST, disks=2)
    finally:
        await lab_hv.close()


async def _reset(uri: str) -> None:
    """The guest and the state an earlier run left, gone."""
    lab_hv = LibvirtHypervisor(uri)
    try:
        lab = Lab(lab_hv)
        if DEMO_GUEST in await lab.names():
            await lab.down(DEMO_GUEST)
    finally:
        await lab_hv.close()
    await asyncio.to_thread(shutil.rmtree, DEMO_STATE, True)


async def run_demo(say: Callable[..., None], uri: str = "qemu:///system") -> dict[str, Any]:
    await _reset(uri)
    settings = Settings(state_dir=DEMO_STATE, libvirt_uri=uri)
    async with open_runtime(settings) as runtime:
        hv = runtime.hv
        say(f"1. booting lab guest {DEMO_GUEST} (TCG, 2 ext4 data disks, qemu-ga) ...")
        dom = await _boot(uri)
        say(f"   guest agent {dom.guest_agent.value}; disks "
            + ", ".join(f"{v.target}={Path(v.active_file).name}" for v in dom.volumes))
        say("2. starting an fsync'd write workload on /data and /data1")
        await start_load(hv, DEMO_GUEST)
        before = len(await freeze_log(hv, DEMO_GUEST))
        try:
            say("3. quiesced snapshot of both disks (freeze, switch overlays, thaw) ...")
            task = await _snapshot(runtime)
        finally:
            await stop_load(hv, DEMO_GUEST)
        events = (await freeze_log(hv, DEMO_GUEST))[before:]
        window_ms = (events[1][1] - events[0][1]) / 1e6 if len(events) >= 2 else None
        writes = (await sh(hv, DEMO_GUEST, "cat /data/load/counter | wc -l")).strip()
        snapshots = task["result"]["snapshots"]
        say("4. checking each point-in-time image with e2fsck -fn")
        checks = await _fsck(snapshots, say)
        say("5. deleting the vda snapshot again (live merge; guest data checked across it)")
        marker = await sh(hv, DEMO_GUEST, "sha256sum /data/load/counter")
        deleted = await _delete(runtime, snapshots[0]["id"])
        if await sh(hv, DEMO_GUEST, "sha256sum /data/load/counter") != marker:
            raise DemoFailed("guest data changed across the merge")
    say("")
    say("summary")
    for snap in snapshots:
        say(f"  snapshot {snap['id']}  {snap['target']}  {snap['consistency']}")
        say(f"    overlay  {snap['file']}")
        say(f"    image    {snap['image']}")
    result = deleted["result"]
    say(f"  deleted {result['snapshot']} by {result['strategy']} "
        f"({result['merged_bytes']} bytes merged; {Path(result['removed']).name} removed)")
    if window_ms is not None:
        say(f"  freeze window seen inside the guest: {window_ms:.1f} ms "
            f"(while {writes} fsync'd writes ran)")
    say(f"  state: {DEMO_STATE}; remove the guest with: gasnap lab down {DEMO_GUEST}")
    if not all(c["e2fsck_exit"] == 0 and not c["journal_recovery"] for c in checks):
        raise DemoFailed("a quiesced image did not pass e2fsck -fn")
    return {"domain": DEMO_GUEST, "task": task, "fsck": checks,
            "freeze_window_ms": window_ms, "delete": deleted}
