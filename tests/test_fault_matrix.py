"""The fault matrix: each fault a production host sees, at each step of a
create, a delete, a revert and a clone (docs/recovery.md, "The fault matrix").

One agent runs every cell.  It stands still at the step (``GASNAP_TEST_HOLD``,
see gasnap.faults), the test breaks something, lets the step go on into the
fault and heals it.  Then, whatever the outcome, nothing is lost:

* the agent has settled the operation (its journal is empty, no record is
  ``creating`` or ``deleting``) and the guest is thawed and running;
* every ``available`` record lies in the live chain as its overlay over its
  image, every file in the volume's directory is a layer of the chain or a
  clone's, and every qcow2 layer passes ``qemu-img check``.

The outcome of each cell (the task's end, the subject's record) must be the
one docs/recovery.md's table names, so the table cannot drift from the code.
The agent SIGKILLed at each step is its own set of tests (the table's first
column names them); it needs a restart per cell.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import libvirtd
from conftest import PREFIX, Agent, backing_path, snap, tmpfs, wait_task, wait_until
from gasnap.client import ApiError
from gasnap.freezeguard import THAW_PAUSE_MAX
from gasnap.hypervisor import Domain, DomainState
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor
from metaservice import TOKEN, MetadataServer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "recovery.md"
FS = Path("/var/lib/gasnap/lab-faults")
FREEZE_TIMEOUT = 3
DEADLINE = 2  # the metadata service's
AWAY = FREEZE_TIMEOUT + 2  # seconds qemu-ga stays away once the step has gone on
# A delete and a clone never ask qemu-ga anything: gone for a moment is as
# gone as for AWAY, and each of their cells no longer waits AWAY for it.
AWAY_UNASKED = 1
PAUSED = "⏸"  # the table's mark: QEMU paused the guest (not compared)
RECORD = os.environ.get("GASNAP_MATRIX_RECORD")  # a file: note outcomes, compare nothing

STEPS = {
    "create": ["planned", "recording", "overlays", "switching", "switched", "finalizing"],
    "delete": ["planned", "deleting", "job", "pivot", "merged", "cleanup"],
    "revert": ["planned", "stopping", "before", "overlays", "switching"],
    "clone": ["recording", "making", "made", "attaching", "finalizing"],
}
FAULTS = ["stop", "libvirtd", "metadata", "qga", "enospc"]
CELLS = [(f"{op}:{step}", fault) for op, steps in STEPS.items() for step in steps
         for fault in FAULTS]


# --- the bench: a small filesystem, a metadata service, one agent ----------------


@pytest.fixture(scope="module")
def small_fs() -> Iterator[Path]:
    with tmpfs(FS, "160m") as path:
        yield path


@dataclass
class Bench:
    hv: LibvirtHypervisor
    lab: Lab
    agent: Agent
    service: MetadataServer
    guest: Domain  # one 32 MiB qcow2 data disk on the small filesystem
    reader: Domain  # what clones are attached to
    hold: Path  # the agent's GASNAP_TEST_HOLD directory
    libvirtd_managed: bool = False  # how libvirtd was running when the test stopped it
    refuser: Refuser | None = None  # the metadata service's port while it is down
    cloned: str = ""  # the snapshot the clone cells clone


@pytest.fixture(scope="module")
async def bench(hv: LibvirtHypervisor, small_fs: Path, service: MetadataServer,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bench]:
    lab = Lab(hv, lab_dir=small_fs)
    guest = await lab.up(f"{PREFIX}faults", disks=1, size_mib=32)
    reader = await lab.up(f"{PREFIX}faults-r", disks=1, size_mib=16)
    base = tmp_path_factory.mktemp("matrix-agent")
    hold = base / "hold"
    hold.mkdir()
    config = (f"[agent]\nfreeze_timeout = {FREEZE_TIMEOUT}\nspare_overlays = false\n"
              # a forced revert destroys the guest after 1 s (the lab guest's
              # graceful power-off takes 10 s on TCG: the matrix has 25 reverts)
              "sweep_interval = 1\nshutdown_timeout = 1\n"
              # every cell adds snapshots: no limit may refuse the next cell
              "[limits]\nmin_free_mib = 0\nmax_snapshots = 1000\nmax_chain_depth = 1000\n"
              f'[metadata]\nurl = "{service.url}"\ntoken = "{TOKEN}"\ndeadline = {DEADLINE}\n')
    agent = Agent(base, config=config, env={"GASNAP_TEST_HOLD": str(hold)})
    try:
        agent.wait_ready()
        yield Bench(hv, lab, agent, service, guest, reader, hold)
    finally:
        agent.stop()
        await lab.down(reader.name)
        await lab.down(guest.name)


# --- one cell ------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "fault"), CELLS, ids=[f"{p}-{f}" for p, f in CELLS])
async def test_fault_at_step(bench: Bench, point: str, fault: str) -> None:
    op = point.partition(":")[0]
    subject = await _prepare(bench, op, point, fault)
    known = set(_snapshots(bench)) | {c["id"] for c in _clones(bench)}
    (bench.hold / "hold").write_text(point)
    request = asyncio.create_task(asyncio.to_thread(_start, bench, op, subject))
    try:
        await _until_held(bench, request)
        await _inject(bench, fault, point)
    finally:
        (bench.hold / "hold").unlink(missing_ok=True)
        await _heal_now(bench, fault)
    task = await request
    done = await asyncio.to_thread(wait_task, bench.agent, task["id"], 300)
    await _heal_after(bench, fault, point)
    paused = await _settled(bench)
    outcome = _outcome(done, await _subject_after(bench, op, subject, known))
    if RECORD:
        with Path(RECORD).open("a") as out:  # noqa: ASYNC230 (a test's own notes)
            out.write(json.dumps({"point": point, "fault": fault, "outcome": outcome,
                                  "paused": paused}) + "\n")
        return
    assert outcome == documented()[(point, fault)], f"{point} {fault}: {done}"


async def _prepare(bench: Bench, op: str, point: str, fault: str) -> str:
    """What the operation works on: a snapshot of its own (none for a create)."""
    if fault == "qga" and point in ("create:switching", "create:switched"):
        # Inside the window nothing can be run in the frozen guest: the
        # freeze hook itself takes qemu-ga away, a second after the freeze.
        await sh(bench.hv, bench.guest.name, f"echo {AWAY} > /run/gasnap-qga-gone")
    if op == "create":
        return ""
    if op == "clone" and bench.cloned:  # clones leave their snapshot as it was
        return bench.cloned
    made = await asyncio.to_thread(snap, bench.agent, bench.guest, f"{point}-{fault}")
    if op == "clone":
        bench.cloned = str(made["id"])
    return str(made["id"])


def _start(bench: Bench, op: str, subject: str) -> dict[str, Any]:
    client = bench.agent.client
    if op == "create":
        body = {"domains": [bench.guest.name], "name": "matrix"}
        answer = client.request("POST", "/v1/snapshots", body)
    elif op == "delete":
        answer = client.request("DELETE", f"/v1/snapshots/{subject}")
    elif op == "revert":
        answer = client.request("POST", f"/v1/snapshots/{subject}/revert", {"force": True})
    else:
        answer = client.request("POST", f"/v1/snapshots/{subject}/clone",
                                {"attach": {"domain": bench.reader.name}})
    task: dict[str, Any] = answer["task"]
    return task


async def _until_held(bench: Bench, request: asyncio.Future[dict[str, Any]]) -> None:
    """Until the agent stands at the step.  Nothing is asked of the agent
    meanwhile: once it holds, it answers nothing."""
    deadline = time.monotonic() + 60
    while not (bench.hold / "held").exists():
        if request.done():
            request.result()  # a request refused up front raises: it says why
        assert time.monotonic() < deadline, "the agent never reached the step"
        await asyncio.sleep(0.02)


# --- faults ----------------------------------------------------------------------


async def _inject(bench: Bench, fault: str, point: str) -> None:
    """Break something while the agent stands at POINT (the hold is lifted by
    the caller, which lets the step go on into the fault)."""
    if fault == "stop":
        os.kill(bench.agent.proc.pid, signal.SIGSTOP)
        # Past freeze_timeout where a guest is frozen (the guard must thaw
        # it); elsewhere nothing runs on the agent's clock, and a second
        # shows the same as four.
        await asyncio.sleep(FREEZE_TIMEOUT + 1 if point in FROZEN else 1)
        (bench.hold / "hold").unlink()
        os.kill(bench.agent.proc.pid, signal.SIGCONT)
    elif fault == "libvirtd":
        bench.libvirtd_managed = await asyncio.to_thread(libvirtd.stop)
    elif fault == "metadata":
        bench.service.kill()
        bench.refuser = await Refuser.open(bench.service.port)
    elif fault == "qga":
        if point in GUEST_OFF:
            await _agent_at_boot(bench, on=False)
        elif point in ("create:switching", "create:switched"):
            await asyncio.sleep(2)  # the freeze hook's timer takes it away
        else:
            await bench.hv.agent.command(bench.guest.name, "guest-exec", {
                "path": "/bin/sh", "arg": ["-c", _QGA_AWAY.format(seconds=_away(point))]},
                10)
            await asyncio.sleep(1)
    elif fault == "enospc":
        free = os.statvfs(FS).f_bavail * os.statvfs(FS).f_frsize
        subprocess.run(["fallocate", "-l", str(free), str(FS / "fill")], check=True)


def _away(point: str) -> int:
    return AWAY_UNASKED if point.startswith(("delete:", "clone:")) else AWAY


_QGA_AWAY = ("touch /run/gasnap-qga-off; (sleep 0.5; kill -9 $(pidof qemu-ga); sleep {seconds}; "
             "rm -f /run/gasnap-qga-off) </dev/null >/dev/null 2>&1 &")


async def _heal_now(bench: Bench, fault: str) -> None:
    """Faults that last a few seconds from the moment the step goes on."""
    if fault == "libvirtd":
        await asyncio.sleep(2)
        await asyncio.to_thread(libvirtd.start, bench.libvirtd_managed)
    elif fault == "metadata" and bench.refuser is not None:
        await bench.refuser.away(DEADLINE + 1)
        bench.refuser = None
        bench.service.start()


class Refuser:
    """The metadata service's port while the service is down: each
    connection is closed at once (an outage to the agent), and noted.  The
    outage lasts OUTAGE seconds from the moment the step goes on and, past
    that, OUTAGE seconds from the last connection refused in that time: a
    call that finds the service away in the window is always away past its
    deadline, however late in the window it starts, and however many calls
    one step makes one after the other (a plan's bounded limits read, then
    the record step's own)."""

    def __init__(self) -> None:
        self.refused: list[float] = []
        self.server: asyncio.Server | None = None

    @classmethod
    async def open(cls, port: int) -> Refuser:
        refuser = cls()
        refuser.server = await asyncio.start_server(refuser._refuse, "127.0.0.1", port,
                                                    reuse_address=True)
        return refuser

    async def _refuse(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.refused.append(time.monotonic())
        writer.close()

    async def away(self, outage: float) -> None:
        window = time.monotonic() + outage
        await asyncio.sleep(outage)
        met = [t for t in self.refused if t <= window]
        if met:
            await asyncio.sleep(max(0.0, max(met) + outage - time.monotonic()))
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _heal_after(bench: Bench, fault: str, point: str) -> None:
    """Faults healed once the operation has ended."""
    if fault == "enospc":
        (FS / "fill").unlink(missing_ok=True)
    elif fault == "qga" and point in GUEST_OFF:
        await _agent_at_boot(bench, on=True)  # the next boot's; this one's is back by now


# Steps at which the guest is frozen.
FROZEN = ("create:switching", "create:switched")

# Steps at which the guest is shut off: its qemu-ga is taken away from the
# boot the operation makes, for AWAY seconds (the lab guest's
# ``gasnap.agent_after``).
# (A disk-only revert keeps the state it leaves once the guest is off: its
# "before" step comes after "stopping".)
GUEST_OFF = ("revert:stopping", "revert:before", "revert:overlays", "revert:switching")


async def _agent_at_boot(bench: Bench, *, on: bool) -> None:
    xml = await asyncio.to_thread(_virsh, "dumpxml", "--inactive", bench.guest.name)
    xml = re.sub(r" gasnap\.agent_after=\d+", "", xml)
    if not on:
        xml = xml.replace("</cmdline>", f" gasnap.agent_after={AWAY}</cmdline>")
    path = bench.hold / "domain.xml"
    path.write_text(xml)
    await asyncio.to_thread(_virsh, "define", str(path))


def _virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout


# --- what must hold after every cell ----------------------------------------------


async def _settled(bench: Bench) -> bool:
    """Wait for the agent to settle everything and check the invariants.
    Whether QEMU had paused the guest (a full disk: it is resumed here, as
    an operator would once space is freed; whether a guest wrote in that
    moment is the guest's business, so it is not part of the outcome)."""
    paused = False
    deadline = time.monotonic() + 90
    while _journal_operations(bench.agent) or _unsettled_records(bench):
        assert time.monotonic() < deadline, "the agent never settled the operation"
        await asyncio.sleep(0.3)
    dom = await bench.hv.get_domain(bench.guest.name)
    if dom.state is DomainState.PAUSED:  # QEMU stopped it on ENOSPC (werror=stop)
        await asyncio.to_thread(_virsh, "resume", dom.name)
        paused = True
    assert dom.state in (DomainState.RUNNING, DomainState.PAUSED), dom.state
    await bench.lab.wait_for_agent(bench.guest.name, timeout=120)
    # A guest agent that was away is thawed by the guard's next retry.
    deadline = time.monotonic() + 2 * THAW_PAUSE_MAX + 5
    while (await bench.hv.agent.fsfreeze_status(dom.name, 10)).value != "thawed":
        assert time.monotonic() < deadline, "the guest stayed frozen"
        await asyncio.sleep(0.5)
    await _chain_and_files_agree(bench, dom)
    return paused


def _journal_operations(agent: Agent) -> int:
    with sqlite3.connect(agent.state_dir / "journal.db") as conn:
        return int(conn.execute("SELECT count(*) FROM operations").fetchone()[0])


def _unsettled_records(bench: Bench) -> list[str]:
    try:
        records = bench.agent.client.get("/v1/snapshots")["snapshots"]
        clones = bench.agent.client.get("/v1/clones")["clones"]
    except ApiError:
        return ["the agent does not answer"]
    return [r["id"] for r in records + clones if r["status"] in ("creating", "deleting")]


# Files whose checks passed, as (path, inode, size, mtime): every cell adds
# layers and records, and a file unchanged since its check is not checked
# again (checking every one in every cell made the matrix quadratic).
_BACKING: dict[tuple[str, int, int, int], str | None] = {}
_CHECKED: set[tuple[str, int, int, int]] = set()


def _stamp(path: str) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def _backing(path: str) -> str | None:
    stamp = _stamp(path)
    if stamp not in _BACKING:
        _BACKING[stamp] = backing_path(path)
    return _BACKING[stamp]


async def _chain_and_files_agree(bench: Bench, dom: Domain) -> None:
    (vol,) = dom.volumes
    chain = [layer.path for layer in vol.chain]
    records = _snapshots(bench).values()
    held = set(chain)
    for rec in records:
        if rec["status"] == "available":
            # In the live chain, or (after a revert) on a branch of it:
            # either way the overlay backs onto the image, on disk.
            assert _backing(rec["file"]) == rec["image"], rec
            held |= {rec["file"], rec["image"]}
    clones = {c["file"] for c in bench.agent.client.get("/v1/clones")["clones"]
              if c["status"] == "available"}
    directory = Path(vol.active_file).parent
    found = {str(p) for p in directory.iterdir() if p.name not in ("fill", "console.log")}
    wanted = held | {c for c in clones if c.startswith(f"{directory}/")}
    assert found == wanted, f"orphans {found - wanted}, missing {wanted - found}"
    for layer in vol.chain:
        if layer.format == "qcow2" and _stamp(layer.path) not in _CHECKED:
            stamp = _stamp(layer.path)  # before the check: a write during it shows next time
            subprocess.run(["qemu-img", "check", "-q", "-U", "-f", "qcow2", layer.path],
                           check=True, capture_output=True)
            _CHECKED.add(stamp)


# --- outcomes ---------------------------------------------------------------------


def _clones(bench: Bench, snapshot_id: str = "") -> list[dict[str, Any]]:
    query = f"?snapshot_id={snapshot_id}" if snapshot_id else ""
    found: list[dict[str, Any]] = bench.agent.client.get(f"/v1/clones{query}")["clones"]
    return found


def _snapshots(bench: Bench) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in bench.agent.client.get(
        f"/v1/snapshots?domain={bench.guest.name}")["snapshots"]}


async def _subject_after(bench: Bench, op: str, subject: str, known: set[str]) -> str:
    """The record the operation was about, as it ended."""
    client = bench.agent.client
    if op == "create":
        mine = [r for i, r in _snapshots(bench).items() if i not in known]
        if not mine:
            return "no record"
        (rec,) = mine
        return f"{rec['status']}/{rec['consistency']}" if rec["status"] == "available" \
            else rec["status"]
    if op == "delete":
        try:
            return str(client.get(f"/v1/snapshots/{subject}")["status"])
        except ApiError as err:
            assert err.code == "snapshot_not_found", err
            return "deleted"
    if op == "revert":
        chain = [layer.path for layer in (await bench.hv.get_domain(
            bench.guest.name)).volumes[0].chain]
        made = client.get(f"/v1/snapshots/{subject}")
        # Back: a new overlay on the snapshot's image.  Not: still on the
        # snapshot's overlay, maybe under the before-revert snapshot's.
        back = chain[1] == made["image"] and chain[0] != made["file"]
        return "on the snapshot" if back else "as before"
    mine = [c for c in _clones(bench, subject) if c["id"] not in known]
    if not mine:
        return "no clone"
    (made,) = mine
    if made["status"] == "available" and made["attached_to"]:
        client.request("POST", f"/v1/clones/{made['id']}/detach", {})
        return "clone attached"
    return f"clone {made['status']}"


def _outcome(task: dict[str, Any], subject: str) -> str:
    if task["state"] == "succeeded":
        return f"succeeded; {subject}"
    return f"failed {task['error']['code']}; {subject}"


def documented() -> dict[tuple[str, str], str]:
    """The matrix in docs/recovery.md: a row per step, a column per fault."""
    text = DOCS.read_text()
    table = text.split("<!-- fault-matrix -->")[1].split("\n## ")[0]  # this section's
    cells: dict[tuple[str, str], str] = {}
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if not re.fullmatch(r"`\w+:\w+`", parts[0]):
            continue
        point = parts[0].strip("`")
        for fault, cell in zip(FAULTS, parts[2:], strict=True):
            cells[(point, fault)] = cell.removesuffix(PAUSED).strip()
    return cells


# --- a plan gone stale while it waited ----------------------------------------------


async def test_a_disk_plugged_before_the_window_fails_the_create(bench: Bench) -> None:
    """The soak's race, made on purpose: the create stands after its overlays
    while a disk is hot-plugged by hand (a clone attach elsewhere would do
    the same).  The window reads the domain first and fails the create,
    nothing switched: the snapshot says error, the chain is as it was."""
    chain = await _chain(bench)
    extra = bench.hold / "extra.raw"
    extra.write_bytes(b"\0" * (1 << 20))
    (bench.hold / "hold").write_text("create:overlays")
    request = asyncio.create_task(asyncio.to_thread(_start, bench, "create", ""))
    known = set(_snapshots(bench))
    try:
        await _until_held(bench, request)
        await asyncio.to_thread(_virsh, "attach-disk", bench.guest.name, str(extra), "vdz",
                                "--live", "--driver", "qemu", "--subdriver", "raw")
    finally:
        (bench.hold / "hold").unlink(missing_ok=True)
    try:
        done = await asyncio.to_thread(wait_task, bench.agent, (await request)["id"], 120)
        assert (done["state"], done["error"]["code"]) == ("failed", "disks_changed"), done
        assert "vdz" in done["error"]["message"]
        assert await _chain(bench) == chain
        (made,) = [r for i, r in _snapshots(bench).items() if i not in known]
        assert made["status"] == "error"
    finally:
        await asyncio.to_thread(_virsh, "detach-disk", bench.guest.name, "vdz", "--live")

        async def unplugged() -> bool:
            return "vdz" not in await asyncio.to_thread(_virsh, "domblklist", bench.guest.name)

        await wait_until(unplugged, 60)
    await _settled(bench)


async def _chain(bench: Bench) -> list[str]:
    return [layer.path for layer in (await bench.hv.get_domain(
        bench.guest.name)).volumes[0].chain]


# --- someone else acts between the plan and the switch -----------------------------

# What an operator (or Nova) does to the domain an operation acts on, outside
# gasnap, while the operation stands between its plan and its switch
# (docs/recovery.md, "Someone else between the plan and the switch").
OTHERS = ["stopped", "started", "renamed", "redefined"]
# The last step before each operation's switch; a revert powers the guest
# off itself at "stopping", so someone stops it before that, and starts,
# renames or redefines it once the revert has.
OTHER_AT = {"create": "create:overlays", "delete": "delete:deleting",
            "revert": "revert:overlays", "clone": "clone:made"}
OTHER_CELLS = [(op, action) for op in OTHER_AT for action in OTHERS]
RENAMED = "-renamed"


@pytest.mark.parametrize(("op", "action"), OTHER_CELLS, ids=[f"{o}-{a}" for o, a in OTHER_CELLS])
async def test_someone_else_between_plan_and_switch(bench: Bench, op: str, action: str) -> None:
    """Nothing is lost whatever someone else does to the domain meanwhile:
    the same checks as every cell, and the outcome docs/recovery.md names."""
    target = bench.reader if op == "clone" else bench.guest  # a clone acts on its reader
    point = "revert:planned" if (op, action) == ("revert", "stopped") else OTHER_AT[op]
    subject = await _prepare(bench, op, point, "")
    if action in ("started", "renamed") and op != "revert":
        # Someone starts, or renames, a domain gasnap planned for shut off.
        await asyncio.to_thread(_virsh, "destroy", target.name)
    known = set(_snapshots(bench)) | {c["id"] for c in _clones(bench)}
    (bench.hold / "hold").write_text(point)
    request = asyncio.create_task(asyncio.to_thread(_start, bench, op, subject))
    try:
        await _until_held(bench, request)
        await asyncio.to_thread(_someone_else, action, target.name, bench.hold)
    finally:
        (bench.hold / "hold").unlink(missing_ok=True)
    task = await request
    done = await asyncio.to_thread(wait_task, bench.agent, task["id"], 300)
    await _put_back(bench, target.name)
    await _settled(bench)
    outcome = _outcome(done, await _subject_after(bench, op, subject, known))
    if RECORD:
        with Path(RECORD).open("a") as out:  # noqa: ASYNC230 (a test's own notes)
            out.write(json.dumps({"op": op, "action": action, "outcome": outcome}) + "\n")
        return
    assert outcome == documented_others()[(op, action)], f"{op} {action}: {done}"


def _someone_else(action: str, name: str, scratch: Path) -> None:
    if action == "stopped":
        _virsh("destroy", name)
    elif action == "started":
        _virsh("start", name)
    elif action == "renamed":  # libvirt renames only a domain that is off
        _virsh("domrename", name, name + RENAMED)
    else:  # undefined and defined again, as it was: the same UUID
        xml = scratch / "redefine.xml"
        xml.write_text(_virsh("dumpxml", "--inactive", name))
        _virsh("undefine", name)
        _virsh("define", str(xml))


async def _put_back(bench: Bench, name: str) -> None:
    """The operator puts things as they were: the name back, the guest running."""
    names = (await asyncio.to_thread(_virsh, "list", "--all", "--name")).split()
    if name + RENAMED in names:
        if name + RENAMED in (await asyncio.to_thread(_virsh, "list", "--name")).split():
            await asyncio.to_thread(_virsh, "destroy", name + RENAMED)
        await asyncio.to_thread(_virsh, "domrename", name + RENAMED, name)
    if (await bench.hv.get_domain(name)).state is DomainState.SHUTOFF:
        await asyncio.to_thread(_virsh, "start", name)
    await bench.lab.wait_for_agent(name, timeout=120)


def documented_others() -> dict[tuple[str, str], str]:
    """docs/recovery.md's table: a row per operation, a column per action."""
    table = DOCS.read_text().split("<!-- someone-else -->")[1].split("\n## ")[0]
    cells: dict[tuple[str, str], str] = {}
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if not re.fullmatch(r"`\w+:\w+`", parts[0]):
            continue
        op = parts[0].strip("`").partition(":")[0]
        for action, cell in zip(OTHERS, parts[1:], strict=True):
            cells[(op, action)] = cell
    return cells
