"""The soak (``make soak``): everything at once, with faults, for SOAK_MINUTES.

Not part of ``make test`` (the file name keeps pytest from collecting it).
Four lab guests (two with a qcow2 data disk, two raw) on a filesystem of
their own, each running a workload that writes small files with fsync and
appends each file's sha256 to a manifest once the file is on disk.  Workers
issue, at random and at once: creates (one disk, a whole domain, a group of
two), deletes (auto, commit, pull), forced reverts, linked clones attached to
another guest and then detached and deleted, schedule runs with retention,
and Nova's ``os-assisted-volume-snapshots`` creates and deletes.  A fault
task meanwhile: SIGKILLs and restarts the agent, restarts libvirtd, kills
qemu-ga in a guest, kills the metadata service for 5-30 s, makes a guest's
qemu-ga hang inside a freeze, and fills the guests' filesystem for a while.
An operator acts outside gasnap too: QEMU SIGKILLed and the guest started
again, a guest shut down and started, renamed and renamed back, undefined
and defined again while it runs, a layer made with virsh by hand (and
committed away by hand while it is still the top), and a burst of writes
faster than an active commit follows.  The guests' directory is reached
through a symlink, as /var/lib/libvirt/images often is.

At the end, once everything is healed and settled, the invariants
(``_inventory``) are counted and asserted (among them: each snapshot's
point-in-time bytes, hashed when it was made, are unchanged while it is
available: no operation on one volume touches another's images), and the report goes to
``SOAK_REPORT`` (docs/soak.md) with the raw events next to it (.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import libvirtd
from conftest import PREFIX, Agent, backing_path, behind_a_symlink, image_digest, tmpfs, wait_task
from gasnap import images
from gasnap.client import ApiError
from gasnap.errors import GasnapError, NotFound
from gasnap.hypervisor import DomainState, Volume
from gasnap.lab.guests import Lab
from gasnap.lab.verify import fsck_raw, raw_copy
from gasnap.lab.workload import sh
from gasnap.qemuimg import QemuImgError
from gasnap.virt import LibvirtHypervisor
from metaservice import TOKEN, MetadataServer

MINUTES = float(os.environ.get("SOAK_MINUTES", "20"))
REPORT = Path(os.environ.get("SOAK_REPORT", str(
    Path(__file__).resolve().parent.parent / "docs" / "soak.md")))
SEED = int(os.environ.get("SOAK_SEED", str(int(time.time()))))
FS = Path("/var/lib/gasnap/lab-soak")
LINK = Path("/var/lib/gasnap/lab-soak-linked")  # what every path says: FS behind a symlink
FREEZE_TIMEOUT = 5
WORKERS = 3

# The workload: one 4 KiB file a second, fsync'd; its line in the manifest
# (sha256sum's format) only once the file is on disk, and the manifest
# synced in turn.  Names carry the boot, so files after a revert are new.
WORKLOAD = """
d=/data/soak; mkdir -p $d; cd $d || exit 1
b=$(cut -c1-8 /proc/sys/kernel/random/boot_id); n=0
while :; do
    f=f$b-$n
    if dd if=/dev/urandom of=$f bs=4k count=1 conv=fsync 2>/dev/null; then
        sha256sum $f >> manifest && sync
        n=$((n + 1))
    fi
    sleep 1
done
"""


# --- the bench -------------------------------------------------------------------------


@dataclass
class Soak:
    hv: LibvirtHypervisor
    lab: Lab
    service: MetadataServer
    base: Path
    config: str
    guests: list[str]
    agent: Agent | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    rss: list[dict[str, float]] = field(default_factory=list)
    ending: bool = False
    faulting: set[str] = field(default_factory=set)  # faults in force now
    evidence: dict[str, Any] = field(default_factory=dict)  # per FAILED item: what it was
    digests: dict[str, str] = field(default_factory=dict)  # snapshot id -> its image's sha256
    hand_layers: set[str] = field(default_factory=set)  # files the operator made with virsh

    def event(self, **what: Any) -> None:
        self.events.append({"t": round(time.monotonic() - START, 2), **what})

    @property
    def client(self) -> Any:
        assert self.agent is not None
        return self.agent.client

    def start_agent(self) -> None:
        self.agent = Agent(self.base, config=self.config, verbose=True)
        self.agent.wait_ready(300)


START = time.monotonic()
# What the operation under way acted on (a snapshot id, a strategy), per worker.
DETAIL: contextvars.ContextVar[str] = contextvars.ContextVar("detail", default="")


@pytest.fixture(scope="module")
def soak_fs() -> Iterator[Path]:
    with tmpfs(FS, "1g") as path:
        yield path


@pytest.fixture(scope="module")
async def soak(hv: LibvirtHypervisor, soak_fs: Path, service: MetadataServer,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Soak]:
    lab = Lab(hv, lab_dir=behind_a_symlink(soak_fs, LINK))
    names = [f"{PREFIX}soak-q1", f"{PREFIX}soak-q2", f"{PREFIX}soak-r1", f"{PREFIX}soak-r2"]
    for name in names:
        await lab.up(name, disks=1, size_mib=64,
                     disk_format="raw" if "-r" in name else "qcow2")
    base = tmp_path_factory.mktemp("soak")
    config = (f"[agent]\nfreeze_timeout = {FREEZE_TIMEOUT}\nsweep_interval = 2\n"
              "shutdown_timeout = 10\n"
              "[limits]\nmin_free_mib = 16\nmax_snapshots = 40\nmax_chain_depth = 30\n"
              f'[metadata]\nurl = "{service.url}"\ntoken = "{TOKEN}"\ndeadline = 10\n'
              f'[schedules.soak]\ndomains = ["{names[0]}", "{names[2]}"]\nkeep = 3\n')
    bench = Soak(hv, lab, service, base, config, names)
    bench.start_agent()
    try:
        yield bench
    finally:
        if bench.agent is not None:
            bench.agent.stop()
        for name in names:
            await lab.down(name)


# --- the run ----------------------------------------------------------------------------


async def test_soak(soak: Soak) -> None:
    random.seed(SEED)
    for name in soak.guests:
        await _start_workload(soak, name)
    deadline = time.monotonic() + MINUTES * 60
    tasks = [asyncio.create_task(_worker(soak, deadline)) for _ in range(WORKERS)]
    tasks.append(asyncio.create_task(_faults(soak, deadline)))
    tasks.append(asyncio.create_task(_sample_rss(soak, deadline)))
    await asyncio.gather(*tasks)
    soak.ending = True
    counts = await _inventory(soak)
    _report(soak, counts)
    failed = {k: v for k, v in counts.items() if k.startswith("FAILED")}
    assert not failed, failed


async def _start_workload(soak: Soak, name: str) -> None:
    await soak.hv.agent.command(name, "guest-exec", {
        "path": "/bin/sh", "arg": ["-c", f"({WORKLOAD}) </dev/null >/dev/null 2>&1 &"]}, 10)


# --- operations ----------------------------------------------------------------------------


async def _worker(soak: Soak, deadline: float) -> None:
    ops: list[tuple[int, Callable[[Soak], Awaitable[str]]]] = [
        (6, _create_one), (3, _create_domain), (2, _create_group), (6, _delete),
        (1, _revert), (2, _clone), (1, _schedule), (2, _nova)]
    weights = [w for w, _ in ops]
    while time.monotonic() < deadline:
        (_, op), = random.choices(ops, weights)
        DETAIL.set("")
        started = time.monotonic()
        try:
            outcome = await op(soak)
        except ApiError as err:
            outcome = f"refused {err.code}"
        except (GasnapError, AssertionError, OSError, KeyError, IndexError) as err:
            # The soak's own reads (libvirtd restarting under them, say):
            # counted, they do not stop the run.
            outcome = f"harness {type(err).__name__}"
        soak.event(kind="op", op=op.__name__.lstrip("_"), outcome=outcome, on=DETAIL.get(),
                   seconds=round(time.monotonic() - started, 3),
                   faults=sorted(soak.faulting))
        await asyncio.sleep(random.uniform(0.2, 2))


def _task_outcome(soak: Soak, answer: dict[str, Any]) -> str:
    task = wait_task(soak.agent, answer["task"]["id"], 600)  # type: ignore[arg-type]
    if task["state"] == "succeeded":
        return "succeeded"
    return f"failed {task['error']['code']}"


async def _call(soak: Soak, method: str, path: str, body: Any = None) -> str:
    answer = await asyncio.to_thread(soak.client.request, method, path, body)
    outcome = await asyncio.to_thread(_task_outcome, soak, answer)
    if outcome == "succeeded":
        await _note_digests(soak, answer["task"]["id"])
    return outcome


async def _note_digests(soak: Soak, task_id: str) -> None:
    """The guest-visible bytes of each snapshot a task made, hashed at once:
    the inventory hashes them again at the end."""
    task = await asyncio.to_thread(soak.client.get, f"/v1/tasks/{task_id}")
    for rec in (task.get("result") or {}).get("snapshots") or []:
        if isinstance(rec, dict) and rec.get("status") == "available" and rec.get("image"):
            with contextlib.suppress(OSError, GasnapError, subprocess.SubprocessError):
                soak.digests[rec["id"]] = await _digest(rec)


async def _digest(rec: dict[str, Any]) -> str:
    header = await asyncio.to_thread(images.read_qcow2_header, rec["file"])
    return await asyncio.to_thread(image_digest, rec["image"], header.backing_format or "")


async def _create_one(soak: Soak) -> str:
    name = random.choice(soak.guests)
    return await _call(soak, "POST", "/v1/snapshots",
                       {"domains": [name], "disks": {name: ["vda"]}, "name": "soak-one",
                        "force": True})  # the soak plays Cinder on vda too


async def _create_domain(soak: Soak) -> str:
    return await _call(soak, "POST", "/v1/snapshots",
                       {"domains": [random.choice(soak.guests)], "name": "soak-domain",
                        "force": True})


async def _create_group(soak: Soak) -> str:
    return await _call(soak, "POST", "/v1/snapshots",
                       {"domains": random.sample(soak.guests, 2), "name": "soak-group",
                        "force": True})


def _available(soak: Soak, name: str | None = None) -> list[dict[str, Any]]:
    query = f"?domain={name}" if name else ""
    return [r for r in soak.client.get(f"/v1/snapshots{query}")["snapshots"]
            if r["status"] == "available"]


async def _delete(soak: Soak) -> str:
    found = await asyncio.to_thread(_available, soak)
    if not found:
        return "nothing to do"
    victim = random.choice(found)
    strategy = random.choice(["auto", "auto", "commit", "pull"])
    DETAIL.set(f"{victim['id']} {strategy}")
    return await _call(soak, "DELETE", f"/v1/snapshots/{victim['id']}?strategy={strategy}")


async def _revert(soak: Soak) -> str:
    found = await asyncio.to_thread(_available, soak)
    if not found:
        return "nothing to do"
    target = random.choice(found)
    DETAIL.set(target["id"])
    outcome = await _call(soak, "POST", f"/v1/snapshots/{target['id']}/revert",
                          {"force": True})
    with contextlib.suppress(Exception):  # a guest that did not come back: the inventory says
        await soak.lab.wait_for_agent(target["domain"], timeout=120)
        await _start_workload(soak, target["domain"])
    return outcome


async def _clone(soak: Soak) -> str:
    found = await asyncio.to_thread(_available, soak)
    if not found:
        return "nothing to do"
    made = random.choice(found)
    reader = random.choice([g for g in soak.guests if g != made["domain"]])
    DETAIL.set(f"{made['id']} to {reader}")
    outcome = await _call(soak, "POST", f"/v1/snapshots/{made['id']}/clone",
                          {"attach": {"domain": reader}})
    clones = [c for c in soak.client.get(f"/v1/clones?snapshot_id={made['id']}")["clones"]
              if c["status"] == "available"]
    for clone in clones:
        await asyncio.sleep(random.uniform(0, 5))
        if clone["attached_to"]:  # answered once the guest let go: no task
            await asyncio.to_thread(soak.client.request, "POST",
                                    f"/v1/clones/{clone['id']}/detach", {})
        await _call(soak, "DELETE", f"/v1/clones/{clone['id']}")
    return outcome


async def _schedule(soak: Soak) -> str:
    return await _call(soak, "POST", "/v1/schedules/soak/run", {})


async def _nova(soak: Soak) -> str:
    """Nova's calls as Cinder's remotefs driver makes them: a create with the
    next overlay's name; a delete of a snapshot Nova made, by commit when it
    is inner, by pull when it is the newest."""
    # Not the schedule's guests: a schedule is gasnap's own, and never
    # changes a volume Cinder keeps snapshots of.
    name = random.choice(soak.guests[1::2])
    dom = await soak.hv.get_domain(name)
    vol = dom.volumes[0]
    mine = [r for r in await asyncio.to_thread(_available, soak, name)
            if r["description"] == "os-assisted-volume-snapshots"]
    if mine and random.random() < 0.5:
        rec = random.choice(mine)
        DETAIL.set(f"delete {rec['id']}")
        chain = [layer.path for layer in vol.chain]
        if rec["file"] == chain[0]:
            below = chain[chain.index(rec["image"]) + 1] if rec["image"] != chain[-1] else None
            info = {"file_to_merge": Path(below).name if below else None,
                    "merge_target_file": None}
        else:
            info = {"file_to_merge": Path(rec["file"]).name,
                    "merge_target_file": Path(rec["image"]).name}
        query = urllib.parse.quote(json.dumps(
            {"volume_id": vol.volume_id, "type": "qcow2", **info}))
        await asyncio.to_thread(soak.client.request, "DELETE",
                                f"/os-assisted-volume-snapshots/{rec['id']}?delete_info="
                                + query)
        return await _until_settled(soak, rec["id"], gone=True)
    sid = str(uuid.uuid4())
    DETAIL.set(f"create {sid}")
    outcome = await _nova_create(soak, vol, sid)
    if outcome == "succeeded":
        with contextlib.suppress(OSError, GasnapError, subprocess.SubprocessError, ApiError):
            rec = await asyncio.to_thread(soak.client.get, f"/v1/snapshots/{sid}")
            soak.digests[sid] = await _digest(rec)
    return outcome


async def _nova_create(soak: Soak, vol: Volume, sid: str) -> str:
    new_file = f"{images.volume_name(vol.volume_id)}.{sid}"  # Cinder's naming
    await asyncio.to_thread(soak.client.request, "POST", "/os-assisted-volume-snapshots", {
        "snapshot": {"volume_id": vol.volume_id, "create_info": {
            "snapshot_id": sid, "type": "qcow2", "new_file": new_file}}})
    return await _until_settled(soak, sid, gone=False)


async def _until_settled(soak: Soak, sid: str, *, gone: bool) -> str:
    """Nova's calls answer before the work is done: the record tells.  A
    create's record is written by its task, which may still be queued behind
    other work on the volume: no record yet means none only once no create
    is queued or running any more."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            rec = await asyncio.to_thread(soak.client.get, f"/v1/snapshots/{sid}")
        except ApiError as err:
            if err.code == "snapshot_not_found":
                if gone:
                    return "succeeded"
                if not await asyncio.to_thread(_creates_pending, soak, sid):
                    return "failed no record"
            elif err.code != "agent_unreachable":
                raise
        else:
            if rec["status"] in ("error", "error_deleting"):
                return f"failed {rec['status']}"
            if rec["status"] == "available" and not gone:
                return "succeeded"
            if rec["status"] == "available" and gone:
                # Nova's delete answers 204 and its task is refused later
                # (a clone reads the files, say): the record stays.
                refused = await asyncio.to_thread(_delete_refused, soak, sid)
                if refused is not None:
                    return f"failed {refused}"
        await asyncio.sleep(0.5)
    return "failed never settled"


def _delete_refused(soak: Soak, sid: str) -> str | None:
    """The code of a failed delete task about SID (its message names it)."""
    try:
        tasks = soak.client.get("/v1/tasks")["tasks"]
    except ApiError:
        return None
    return next((t["error"]["code"] for t in reversed(tasks)
                 if t["kind"] == "snapshot-delete" and t["state"] == "failed"
                 and sid in t["error"].get("message", "")), None)


def _creates_pending(soak: Soak, sid: str) -> bool:
    """Whether a create may still record SID: one is queued or running, or
    the record appeared meanwhile."""
    try:
        tasks = soak.client.get("/v1/tasks")["tasks"]
        if any(t["kind"] in ("snapshot-create", "schedule-run")
               and t["state"] in ("queued", "running") for t in tasks):
            return True
        soak.client.get(f"/v1/snapshots/{sid}")
    except ApiError as err:
        return err.code == "agent_unreachable"  # cannot tell yet
    return True


# --- faults ---------------------------------------------------------------------------------


async def _faults(soak: Soak, deadline: float) -> None:
    faults: list[Callable[[Soak], Awaitable[str]]] = [
        _kill_agent, _restart_libvirtd, _kill_qga, _metadata_away, _qga_hangs, _fill,
        # the operator, outside gasnap
        _qemu_killed, _shut_down_and_started, _renamed_and_back, _undefined_and_defined,
        _hand_layer, _burst]
    while time.monotonic() < deadline:
        await asyncio.sleep(random.uniform(15, 45))
        if time.monotonic() >= deadline:
            break
        fault = random.choice(faults)
        kind = fault.__name__.lstrip("_")
        soak.faulting.add(kind)
        started = time.monotonic()
        try:
            detail = await fault(soak)
        except (GasnapError, AssertionError, OSError, subprocess.SubprocessError) as err:
            detail = f"could not be made: {type(err).__name__}: {err}"
        finally:
            soak.faulting.discard(kind)
        soak.event(kind="fault", fault=kind, detail=detail,
                   seconds=round(time.monotonic() - started, 3))


async def _kill_agent(soak: Soak) -> str:
    assert soak.agent is not None
    os.kill(soak.agent.proc.pid, signal.SIGKILL)
    soak.agent.wait_exit()
    await asyncio.to_thread(soak.start_agent)
    return "SIGKILL, restarted"


async def _restart_libvirtd(soak: Soak) -> str:
    managed = await asyncio.to_thread(libvirtd.stop)
    await asyncio.sleep(random.uniform(0.5, 5))
    await asyncio.to_thread(libvirtd.start, managed)
    return "systemd" if managed else "daemon"


async def _kill_qga(soak: Soak) -> str:
    name = random.choice(soak.guests)
    with contextlib.suppress(Exception):  # frozen or away already: nothing to kill now
        await soak.hv.agent.command(name, "guest-exec", {
            "path": "/bin/sh", "arg": ["-c", "(sleep 0.3; kill -9 $(pidof qemu-ga)) "
                                             "</dev/null >/dev/null 2>&1 &"]}, 10)
        return name
    return f"{name}: not reachable"


async def _metadata_away(soak: Soak) -> str:
    seconds = random.uniform(5, 30)
    soak.service.kill()
    await asyncio.sleep(seconds)
    await asyncio.to_thread(soak.service.start)
    return f"{seconds:.0f}s"


async def _qga_hangs(soak: Soak) -> str:
    name = random.choice(soak.guests)
    try:
        await sh(soak.hv, name, f"echo {FREEZE_TIMEOUT + 3} > /run/gasnap-hook-delay")
        await asyncio.sleep(random.uniform(10, 30))
    finally:
        with contextlib.suppress(Exception):
            await sh(soak.hv, name, "rm -f /run/gasnap-hook-delay", timeout=60)
    return name


async def _fill(soak: Soak) -> str:
    st = os.statvfs(FS)
    size = max(st.f_bavail * st.f_frsize - (2 << 20), 0)
    subprocess.run(["fallocate", "-l", str(size), str(FS / "fill")], check=True)
    try:
        await asyncio.sleep(random.uniform(5, 20))
    finally:
        (FS / "fill").unlink(missing_ok=True)
    resumed = []
    for name in soak.guests:  # as an operator does once space is back
        if (await soak.hv.get_domain(name)).state is DomainState.PAUSED:
            subprocess.run(["virsh", "-q", "resume", name], check=False, capture_output=True)
            resumed.append(name)
    return f"{size >> 20} MiB; resumed {resumed}" if resumed else f"{size >> 20} MiB"


# --- the operator, outside gasnap ---------------------------------------------------------


async def _virsh(*args: str) -> str:
    proc = await asyncio.to_thread(subprocess.run, ["virsh", "-q", "-c", "qemu:///system",
                                                    *args],
                                   capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


async def _state(soak: Soak, name: str) -> DomainState:
    return (await soak.hv.get_domain(name)).state


async def _back_up(soak: Soak, name: str) -> None:
    """What the operator does last: NAME runs again, and its workload.  A
    start that fails (libvirtd restarting kills a QEMU it is starting;
    qemu-img holds the disk's write lock while gasnap merges the stopped
    domain) is tried again, as an operator would, for a few minutes."""
    deadline = time.monotonic() + 300
    while True:
        try:
            if await _state(soak, name) is DomainState.SHUTOFF:
                await _virsh("start", name)
            await soak.lab.wait_for_agent(name, timeout=120)
            break
        except (OSError, GasnapError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(2)
    await _start_workload(soak, name)


async def _until_off(soak: Soak, name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while await _state(soak, name) is not DomainState.SHUTOFF:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


@contextlib.asynccontextmanager
async def _taken_down(soak: Soak) -> AsyncIterator[str]:
    """A guest the operator takes down by hand: whatever happens meanwhile,
    it runs again afterwards, its workload too."""
    name = random.choice(soak.guests)
    try:
        yield name
    finally:
        await _back_up(soak, name)


async def _qemu_killed(soak: Soak) -> str:
    async with _taken_down(soak) as name:
        os.kill(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text()), signal.SIGKILL)
        await _until_off(soak, name, 30)
        await asyncio.sleep(random.uniform(0, 5))
    return name


async def _shut_down_and_started(soak: Soak) -> str:
    async with _taken_down(soak) as name:
        await _virsh("shutdown", name)
        if not await _until_off(soak, name, 60):
            await _virsh("destroy", name)
        await asyncio.sleep(random.uniform(0, 10))
    return name


async def _renamed_and_back(soak: Soak) -> str:
    """libvirt renames only a domain that is off."""
    async with _taken_down(soak) as name:
        await _virsh("destroy", name)
        await _virsh("domrename", name, f"{name}-renamed")
        await asyncio.sleep(random.uniform(1, 10))
        await _virsh("domrename", f"{name}-renamed", name)
    return name


async def _undefined_and_defined(soak: Soak) -> str:
    """A running domain made transient for a while (as Nova once did around
    block jobs), then defined again from its live XML as it is then."""
    name = random.choice(soak.guests)
    await _virsh("undefine", name)
    try:
        await asyncio.sleep(random.uniform(1, 10))
    finally:
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as xml:
            xml.write(await _virsh("dumpxml", "--migratable", name))
            xml.flush()
            await _virsh("define", xml.name)
    return name


async def _hand_layer(soak: Soak) -> str:
    """An external overlay made with virsh (no quiesce, no record); taken
    away again by hand only if it is still the top layer later."""
    name = random.choice(soak.guests)
    vol = (await soak.hv.get_domain(name)).volumes[0]
    path = f"{os.path.dirname(vol.active_file)}/hand-{uuid.uuid4().hex[:8]}.qcow2"
    await _virsh("snapshot-create-as", name, "--disk-only", "--no-metadata", "--atomic",
                 "--diskspec", f"{vol.target},snapshot=external,file={path}")
    soak.hand_layers.add(path)
    await asyncio.sleep(random.uniform(5, 30))
    now = (await soak.hv.get_domain(name)).volume(vol.target)
    if now is None or now.active_file != path:
        return f"{name}: {Path(path).name} left in the chain"
    await _virsh("blockcommit", name, vol.target, "--active", "--pivot", "--wait",
                 "--timeout", "120")
    Path(path).unlink()
    soak.hand_layers.discard(path)
    return f"{name}: {Path(path).name} committed away"


async def _burst(soak: Soak) -> str:
    """Writes faster than an active commit of the volume can follow."""
    name = random.choice(soak.guests)
    await sh(soak.hv, name, "for i in 1 2 3; do dd if=/dev/urandom of=/data/burst bs=1M "
                            "count=8 conv=fsync 2>/dev/null; rm -f /data/burst; done; true",
             timeout=180)
    return name


async def _sample_rss(soak: Soak, deadline: float) -> None:
    while time.monotonic() < deadline:
        st = os.statvfs(FS)
        sample = {"t": round(time.monotonic() - START),
                  "fs_free_mib": round(st.f_bavail * st.f_frsize / (1 << 20), 1)}
        if soak.agent is not None:
            sample["agent_mib"] = _rss_mib(soak.agent.proc.pid)
            guard = subprocess.run(["pgrep", "-f", "-P", str(soak.agent.proc.pid),
                                    "gasnap.freezeguard"], capture_output=True, text=True,
                                   check=False)
            if guard.stdout.split():
                sample["guard_mib"] = _rss_mib(int(guard.stdout.split()[0]))
        soak.rss.append(sample)
        await asyncio.sleep(15)


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# --- the inventory ---------------------------------------------------------------------------


async def _inventory(soak: Soak) -> Counter[str]:
    """Everything settled, then every invariant counted: ``ok ...`` per item
    checked, ``FAILED ...`` per item that broke one."""
    counts: Counter[str] = Counter()
    await _settle_everything(soak)
    records = soak.client.get("/v1/snapshots")["snapshots"]
    clones = soak.client.get("/v1/clones")["clones"]
    for rec in records + clones:
        counts["ok settled record" if rec["status"] not in ("creating", "deleting")
               else "FAILED record left creating/deleting"] += 1
    held: set[str] = {c["file"] for c in clones if c["status"] == "available"}
    mounted: set[str] = set()  # the guests' own data disks, which the workload mounts
    for name in soak.guests:
        try:
            dom = await soak.hv.get_domain(name)
        except NotFound:
            counts[f"FAILED guest {name} gone"] += 1
            continue
        mounted |= {v.volume_id for v in dom.volumes if v.target == "vda"}
        running = dom.state is DomainState.RUNNING
        counts["ok guest running" if running else f"FAILED guest {dom.state.value}"] += 1
        if running:
            status = (await soak.hv.agent.fsfreeze_status(name, 30)).value
            counts["ok guest thawed" if status == "thawed" else "FAILED guest frozen"] += 1
        vol = dom.volumes[0]
        chain = [layer.path for layer in vol.chain]
        held |= set(chain)
        for layer in vol.chain:
            ok = (await asyncio.to_thread(_qemu_img_check, layer.path, layer.format))
            counts["ok qemu-img check" if ok else f"FAILED qemu-img check {layer.path}"] += 1
        if running:
            await _check_workload_live(soak, name, counts)
    for rec in records:
        if rec["status"] != "available":
            continue
        held |= {rec["file"], rec["image"]}
        backing = backing_path(rec["file"])
        counts["ok record's overlay backs onto its image" if backing == rec["image"]
               else f"FAILED {rec['id']} backs onto {backing}"] += 1
        if backing != rec["image"]:
            soak.evidence[rec["id"]] = {"record": rec, "backing": backing}
        if rec["consistency"] == "filesystem" and rec["volume_id"] in mounted:
            await _check_image(soak, rec, counts)
        elif rec["consistency"] == "filesystem":
            # A clone attached to a guest that never mounts it: the freeze
            # quiesced nothing there, and its filesystem is whatever the
            # clone's source was (a crash-consistent snapshot's needs
            # journal recovery).  Not the freeze's claim to check.
            counts["not checked: e2fsck of a clone disk the guest does not mount"] += 1
    for rec_id, digest in soak.digests.items():
        rec = next((r for r in records if r["id"] == rec_id and r["status"] == "available"),
                   None)
        if rec is None:
            continue  # deleted since: its image was allowed to change
        try:
            now = await _digest(rec)
        except (OSError, GasnapError, subprocess.SubprocessError) as err:
            now = f"unreadable: {err}"
        counts["ok a snapshot's point-in-time bytes are unchanged" if now == digest
               else f"FAILED point-in-time bytes of {rec_id} changed"] += 1
        if now != digest:
            soak.evidence[rec_id] = {"record": rec, "digest": digest, "now": now}
    for path in soak.hand_layers:
        counts["ok a layer made by hand is still in its chain" if path in held
               else f"FAILED hand-made layer {path} left its chain"] += 1
    for directory in {Path(p).parent for p in held if p.startswith(str(LINK))}:
        for path in directory.iterdir():
            if path.name in ("console.log",) or ".gasnap-spare" in path.name:
                continue
            counts["ok file accounted for" if str(path) in held
                   else f"FAILED orphan {path}"] += 1
    for path in held:
        counts["ok file present" if Path(path).exists() else f"FAILED missing {path}"] += 1
    return counts


async def _settle_everything(soak: Soak) -> None:
    for name in soak.guests:
        try:
            state = (await soak.hv.get_domain(name)).state
        except NotFound:
            continue  # gone: counted by the inventory, not waited for
        if state is DomainState.PAUSED:
            subprocess.run(["virsh", "-q", "resume", name], check=False)
        if state is not DomainState.SHUTOFF:  # one left off is counted, not waited for
            await soak.lab.wait_for_agent(name, timeout=300)
    deadline = time.monotonic() + 600
    while True:
        busy = [t for t in soak.client.get("/v1/tasks")["tasks"]
                if t["state"] in ("queued", "running")]
        records = soak.client.get("/v1/snapshots")["snapshots"]
        unsettled = [r for r in records if r["status"] in ("creating", "deleting")]
        if not busy and not unsettled:
            return
        if time.monotonic() > deadline:
            return  # the inventory counts what is left
        await asyncio.sleep(2)


def _qemu_img_check(path: str, fmt: str) -> bool:
    if fmt != "qcow2":
        return True
    return subprocess.run(["qemu-img", "check", "-q", "-U", "-f", "qcow2", path],
                          capture_output=True, check=False).returncode == 0


async def _check_workload_live(soak: Soak, name: str, counts: Counter[str]) -> None:
    """Every file the manifest lists is there with its sha256, as the guest sees it."""
    await sh(soak.hv, name, "kill $(pgrep -f 'd=/data/soak') 2>/dev/null; sync; true")
    out = await sh(soak.hv, name, "cd /data/soak && wc -l < manifest && "
                                  "(sha256sum -c manifest >/dev/null 2>&1 && echo ok || echo bad)")
    lines, verdict = out.split()
    counts[f"ok workload files in the live state ({name})"] += int(lines) if verdict == "ok" else 0
    if verdict != "ok":
        counts[f"FAILED workload files in the live state of {name}"] += 1


async def _check_image(soak: Soak, rec: dict[str, Any], counts: Counter[str]) -> None:
    """A filesystem-consistent image: e2fsck -fn clean, and every file its
    own manifest lists present with its sha256.  The image's format is the
    one gasnap wrote into the overlay's header."""
    header = await asyncio.to_thread(images.read_qcow2_header, rec["file"])
    try:
        async with raw_copy(rec["image"], header.backing_format or "") as raw:
            fsck = await fsck_raw(raw)
            counts["ok e2fsck -fn of a filesystem snapshot" if fsck.clean
                   else f"FAILED e2fsck {rec['id']}"] += 1
            if not fsck.clean:  # which record, and what e2fsck saw: the next lead
                soak.evidence[rec["id"]] = {"record": rec, "e2fsck": fsck.output[-4000:]}
            await _check_manifest(raw, rec, counts)
    except QemuImgError as err:
        counts[f"FAILED image of {rec['id']} cannot be read: {err.message}"] += 1


async def _check_manifest(raw: Path, rec: dict[str, Any], counts: Counter[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="gasnap-soak-") as tmp:
        dump = Path(tmp)
        await asyncio.to_thread(subprocess.run, ["debugfs", "-R", f"rdump /soak {dump}",
                                                 str(raw)], capture_output=True, check=False)
        manifest = dump / "soak" / "manifest"
        if not manifest.exists():
            counts["ok snapshot taken before the workload"] += 1
            return
        check = await asyncio.to_thread(
            subprocess.run, ["sha256sum", "--quiet", "-c", "manifest"], cwd=dump / "soak",
            capture_output=True, text=True, check=False)
        if check.returncode == 0:
            counts["ok workload files in filesystem snapshots"] += len(
                manifest.read_text().splitlines())
        else:
            counts[f"FAILED workload files in snapshot {rec['id']}"] += 1


# --- the report ---------------------------------------------------------------------------------


def _report(soak: Soak, counts: Counter[str]) -> None:
    ops = [e for e in soak.events if e["kind"] == "op"]
    faults = [e for e in soak.events if e["kind"] == "fault"]
    lines = ["# Soak report", "",
             f"`make soak` (SOAK_MINUTES={MINUTES:g}, seed {SEED}): four lab guests (two "
             "qcow2, two raw data disks) under an fsync'd write workload, "
             f"{WORKERS} workers issuing operations at random, faults every 15-45 s. "
             "Written by tests/soak.py; the raw events are in "
             f"{REPORT.with_suffix('.json').name}.", "", _verdict(counts), "",
             "## Operations", "", "| operation | outcomes | p50 s | p90 s | p99 s |",
             "| --- | --- | --- | --- | --- |"]
    for name in sorted({e["op"] for e in ops}):
        mine = [e for e in ops if e["op"] == name]
        seconds = sorted(e["seconds"] for e in mine)
        outcomes = Counter(e["outcome"] for e in mine)
        text = ", ".join(f"{k}: {v}" for k, v in outcomes.most_common())
        lines.append(f"| {name} | {text} | {_pct(seconds, 50)} | {_pct(seconds, 90)} | "
                     f"{_pct(seconds, 99)} |")
    lines += ["", "## Faults", "", "| fault | times |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in Counter(e["fault"] for e in faults).most_common()]
    lines += ["", "## Invariants at the end", "", "| check | count |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    agent = [s["agent_mib"] for s in soak.rss if "agent_mib" in s]
    guard = [s["guard_mib"] for s in soak.rss if "guard_mib" in s]
    lines += ["", "## Memory (RSS, sampled every 15 s)", ""]
    for what, values in (("agent", agent), ("freeze guard", guard)):
        if values:
            lines.append(f"- {what}: first {values[0]} MiB, last {values[-1]} MiB, "
                         f"max {max(values)} MiB ({len(values)} samples; an agent "
                         "restarted by a fault starts over)")
    free = [s["fs_free_mib"] for s in soak.rss]
    if free:
        lines.append(f"- the guests' filesystem (1 GiB): {min(free)} to {max(free)} MiB free")
    REPORT.write_text("\n".join(lines) + "\n")
    REPORT.with_suffix(".json").write_text(json.dumps(
        {"seed": SEED, "minutes": MINUTES, "events": soak.events, "rss": soak.rss,
         "invariants": counts, "evidence": soak.evidence}, indent=1) + "\n")


def _verdict(counts: Counter[str]) -> str:
    broken = sum(v for k, v in counts.items() if k.startswith("FAILED"))
    checked = sum(v for k, v in counts.items() if not k.startswith("not checked"))
    if not broken:
        return f"**Result: every invariant held** ({checked} checks)."
    return (f"**Result: {broken} of {checked} checks broke an invariant** (the FAILED rows "
            "below): gasnap lost or damaged what these name, and `make soak` failed.")


def _pct(values: list[float], pct: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[pct - 1]:.2f}"
