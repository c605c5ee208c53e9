"""Shared fixtures: one libvirt connection, session-scoped lab guests, a running agent.

Lab guests are real TCG domains booted from the lab image; they are created
once per session and reused.  Every lab guest of the tests is named ``gt-*``,
and leftovers of an earlier, interrupted run are reaped before the first one
boots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gasnap.client import ApiClient
from gasnap.hypervisor import Domain
from gasnap.images import read_qcow2_header
from gasnap.lab.bare import BareLab
from gasnap.lab.guests import DEFAULT_LAB_DIR, Lab
from gasnap.lab.workload import sh
from gasnap.qmp.backend import QmpHypervisor
from gasnap.qmp.graph import disks, format_nodes
from gasnap.virt import LibvirtHypervisor
from metaservice import MetadataServer, free_port
from pgcluster import Cluster, private_cluster

URI = "qemu:///system"
PREFIX = "gt-"
GASNAP = [sys.executable, "-m", "gasnap.cli.main"]


def gasnap(*args: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    """Run the real ``gasnap`` command line."""
    proc = subprocess.run([*GASNAP, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"gasnap {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A private PostgreSQL cluster (temp dir, free port, user postgres)."""
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def service(postgres: Cluster, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[MetadataServer]:
    """The reference metadata service on a database of its own, per module."""
    server = MetadataServer(postgres.new_database(),
                            tmp_path_factory.mktemp("meta") / "service.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def hv() -> AsyncIterator[LibvirtHypervisor]:
    hypervisor = LibvirtHypervisor(URI)
    await hypervisor.connect()
    yield hypervisor
    await hypervisor.close()


LINKED_LAB = Path("/var/lib/gasnap/lab-linked")


def behind_a_symlink(real: Path, link: Path) -> Path:
    """LINK, a symlink to REAL (both made if missing)."""
    real.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == str(real)):
        link.unlink(missing_ok=True)
        link.symlink_to(real)
    return link


@pytest.fixture(scope="session")
async def lab(hv: LibvirtHypervisor) -> AsyncIterator[Lab]:
    """Lab guests whose image directory is reached through a symlink, as
    /var/lib/libvirt/images often is: every lab test (and every ``gasnap``
    the tests run) meets one file under two spellings.  The docs' pages
    and ``make demo`` use the plain directory."""
    os.environ.setdefault("GASNAP_LAB_DIR", str(behind_a_symlink(DEFAULT_LAB_DIR, LINKED_LAB)))
    the_lab = Lab(hv)
    for name in await the_lab.names():
        if name.startswith(PREFIX):
            await the_lab.down(name)
    yield the_lab


@pytest.fixture(scope="session")
async def guest(lab: Lab) -> AsyncIterator[Domain]:
    """The shared lab guest: two data disks, guest agent connected."""
    dom = await lab.up(f"{PREFIX}main", disks=2, size_mib=64)
    yield dom
    await lab.down(dom.name)


@pytest.fixture(scope="session")
async def second(lab: Lab) -> AsyncIterator[Domain]:
    """Another lab guest with two disks, for groups and state changes."""
    dom = await lab.up(f"{PREFIX}second", disks=2, size_mib=64)
    yield dom
    await lab.down(dom.name)


@pytest.fixture(scope="session")
async def merge_guest(lab: Lab) -> AsyncIterator[Domain]:
    """A lab guest for deletes: one 256 MiB disk, room for long merges."""
    dom = await lab.up(f"{PREFIX}merge", disks=1, size_mib=256)
    yield dom
    await lab.down(dom.name)


@pytest.fixture(scope="session")
async def raw_guest(lab: Lab) -> AsyncIterator[Domain]:
    """A lab guest whose one data disk is raw (a Cinder NFS volume's layout)."""
    dom = await lab.up(f"{PREFIX}raw", disks=1, size_mib=64, disk_format="raw")
    yield dom
    await lab.down(dom.name)


@pytest.fixture(scope="session")
async def noagent(lab: Lab) -> AsyncIterator[Domain]:
    """A lab guest whose qemu-ga never starts."""
    dom = await lab.up(f"{PREFIX}noagent", disks=1, size_mib=32, agent=False)
    yield dom
    await lab.down(dom.name)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gasnap serve exited {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError("gasnap serve did not listen in time")



def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gasnap serve exited {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("gasnap serve did not listen in time")


class Agent:
    """A running ``gasnap serve`` process with its own socket and state dir."""

    def __init__(self, base: Path, env: dict[str, str] | None = None,
                 config: str | None = None, tcp_token: str | None = None,
                 verbose: bool = False) -> None:
        """TCP_TOKEN: listen on a free TCP port with that token (else a unix
        socket).  VERBOSE: the agent logs at DEBUG."""
        self.base = base
        self.sock = base / "api.sock"
        self.port = free_port() if tcp_token else 0
        listen = f"tcp:127.0.0.1:{self.port}" if tcp_token else f"unix:{self.sock}"
        self.api = f"http://127.0.0.1:{self.port}" if tcp_token else listen
        self.state_dir = base / "state"
        self.log = base / "agent.log"
        self.client = ApiClient(self.api, token=tcp_token)
        args = [*GASNAP, *(["-vv"] if verbose else []), "serve", "--listen", listen,
                "--state-dir", str(self.state_dir), "--libvirt-uri", URI]
        if tcp_token:
            args += ["--token", tcp_token]
        if config is not None:
            (base / "agent.toml").write_text(config)
            args += ["--config", str(base / "agent.toml")]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if tcp_token:
            _wait_for_port(self.port, self.proc)
        else:
            _wait_for_socket(self.sock, self.proc)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until recovery has settled the journal."""
        deadline = time.monotonic() + timeout
        while self.client.get("/v1/health")["recovery"] != "done":
            assert time.monotonic() < deadline, "agent recovery did not finish"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A filesystem of SIZE of its own at PATH (lab guests whose disks fill
    it up without touching the host's)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"gasnap-{path.name}",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def running_agent(base: Path, **options: Any) -> Iterator[Agent]:
    """An ``Agent`` (OPTIONS: its env, config, tcp_token), recovered, stopped afterwards."""
    running = Agent(base, **options)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """``gasnap serve`` as a real process on a private unix socket and state dir."""
    with running_agent(tmp_path_factory.mktemp("agent")) as running:
        yield running


# --- both hypervisor backends ---------------------------------------------------


@dataclass
class Rig:
    """One hypervisor backend: the test's own view of it, its lab guests and
    an agent on it.  Tests that take ``rig`` run on libvirt and on bare QEMU
    over QMP alike (the ids say which)."""

    backend: str  # "libvirt" or "qmp"
    hv: Any  # LibvirtHypervisor or QmpHypervisor: what the test reads with
    agent: Agent  # the session's agent on this backend
    guest: Domain  # two qcow2 data disks
    merge: Domain  # one 256 MiB qcow2 disk
    raw: Domain  # one raw data disk
    second: Domain  # another guest, for groups (libvirt: two disks; qmp: ``raw``)
    lab: Lab | None = None  # libvirt: the lab that starts guests
    run_dir: Path | None = None  # qmp: where the guests' sockets are
    bare: BareLab | None = None  # qmp: the lab that starts them

    async def up(self, name: str, **options: Any) -> Domain:
        """Another lab guest on this backend (OPTIONS as ``Lab.up``)."""
        if self.bare is None:
            assert self.lab is not None
            return await self.lab.up(name, **options)
        await self.bare.up(name, **options)
        found: Domain = await self.hv.get_domain(name)
        return found

    async def down(self, name: str) -> None:
        if self.bare is None:
            assert self.lab is not None
            await self.lab.down(name)
        else:
            await self.bare.down(name)

    def toml(self, **agent: object) -> str:
        """An agent's configuration on this backend, with AGENT's keys."""
        keys = dict(agent)
        if self.backend == "qmp":
            keys["hypervisor"] = "qmp"
        text = "[agent]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
        if self.run_dir is not None:
            text += f"[qmp]\nrun_dir = {_toml(str(self.run_dir))}\n"
        return text

    def new_agent(self, base: Path, *, env: dict[str, str] | None = None,
                  **agent: object) -> Agent:
        return Agent(base, env=env, config=self.toml(**agent))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@pytest.fixture(scope="session")
async def qmp_rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """Bare QEMU lab guests (no libvirt) and an agent with hypervisor = "qmp"."""
    base = tmp_path_factory.mktemp("qmp")
    lab = BareLab(run_dir=base / "run",
                  lab_dir=behind_a_symlink(base / "lab.real", base / "lab"))
    names = {"guest": (f"{PREFIX}q-main", 2, "qcow2", 64),
             "merge": (f"{PREFIX}q-merge", 1, "qcow2", 256),
             "raw": (f"{PREFIX}q-raw", 1, "raw", 64)}
    await asyncio.gather(*(lab.up(n, disks=d, size_mib=m, disk_format=f)
                           for n, d, f, m in names.values()))
    hv = QmpHypervisor(lab.run_dir)
    doms = {key: await hv.get_domain(n) for key, (n, *_rest) in names.items()}
    try:
        probe = Rig("qmp", hv, None, second=doms["raw"],  # type: ignore[arg-type]
                    run_dir=lab.run_dir, bare=lab, **doms)
        (base / "agent").mkdir()
        with running_agent(base / "agent", config=probe.toml()) as agent:
            probe.agent = agent
            yield probe
    finally:
        await hv.close()
        for n, *_rest in names.values():
            await lab.down(n)


@pytest.fixture(scope="session", params=["libvirt", "qmp"])
def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "qmp":
        found: Rig = request.getfixturevalue("qmp_rig")
        return found
    value = request.getfixturevalue
    return Rig("libvirt", value("hv"), value("agent"), value("guest"), value("merge_guest"),
               value("raw_guest"), value("second"), lab=value("lab"))


def qemu_open_files(hv: QmpHypervisor, name: str) -> set[str]:
    """The files a bare QEMU guest's process holds open."""
    pid = int((hv.run_dir / f"{name}.pid").read_text())
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we listed them
            found.add(os.readlink(fd))
    return found


async def commit_by_hand(rig: Rig, name: str, target: str, top: str, base: str) -> None:
    """Change a chain behind gasnap's back: TOP committed into BASE, as an
    operator would with the backend's own tools."""
    if rig.backend == "libvirt":
        subprocess.run(["virsh", "blockcommit", name, target, "--top", top, "--base", base,
                        "--wait", "--keep-relative"], check=True, capture_output=True)
        return
    hv: QmpHypervisor = rig.hv
    async with hv.sessions.using(name) as qmp:
        disk = (await disks(qmp))[target]
        root, chain = disk.root, disk.chain
        nodes = await format_nodes(qmp)
        formats = {layer.path: layer.format for layer in chain}
        above = [layer.path for layer in chain][[lr.path for lr in chain].index(top) - 1]
        await qmp.call("block-commit", {
            "job-id": "by-hand", "device": root, "top-node": nodes[(top, formats[top])],
            "base-node": nodes[(base, formats[base])],
            "backing-file": os.path.relpath(base, os.path.dirname(above))})

        async def done() -> bool:
            return not await qmp.call("query-block-jobs")

        await wait_until(done)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a lab fixture are marked ``lab`` (select with -m)."""
    lab_fixtures = {"guest", "lab", "hv", "agent", "second", "noagent", "merge_guest",
                    "raw_guest", "rig", "qmp_rig"}
    for item in items:
        if lab_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


async def wait_until(predicate: object, timeout: float = 30, interval: float = 0.2) -> None:
    """Poll an async predicate until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():  # type: ignore[operator]
            return
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Domains the test defines; undefined afterwards, whatever happened."""
    defined: list[str] = []
    yield defined
    for name in defined:
        subprocess.run(["virsh", "-q", "undefine", name], capture_output=True, check=False)


# --- helpers for snapshot tests ------------------------------------------------


def create_snapshots(agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/snapshots and wait for the task to end; the finished task."""
    task = agent.client.request("POST", "/v1/snapshots", body)["task"]
    return wait_task(agent, task["id"])


def snap(agent: Agent, dom: Domain, name: str) -> dict[str, Any]:
    """One snapshot of every disk of DOM, named NAME; its (first) record."""
    task = create_snapshots(agent, {"domains": [dom.name], "name": name})
    assert task["state"] == "succeeded", task
    record: dict[str, Any] = task["result"]["snapshots"][0]
    return record


def wait_task(agent: Agent, task_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = agent.client.get(f"/v1/tasks/{task_id}?wait=10")
        if task["state"] in ("succeeded", "failed"):
            return task
        assert time.monotonic() < deadline, f"task {task_id} did not end"


async def chain_of(hv: Any, domain: str, target: str) -> list[str]:
    vol = (await hv.get_domain(domain)).volume(target)
    assert vol is not None
    return [layer.path for layer in vol.chain]


async def hv_call(hv: LibvirtHypervisor, name: str, method: str) -> None:
    """A plain libvirt domain method (suspend, resume, ...) the interface lacks."""
    await hv.connection.call(lambda c: getattr(c.lookupByName(name), method)(),
                             what=f"{method} {name}")


async def freeze_status(hv: Any, domain: str) -> str:
    return (await hv.agent.fsfreeze_status(domain, 5)).value


def volume_files(path: str) -> set[str]:
    """The files of the volume whose active file is PATH: its base file and
    every overlay named after it (``volume-<uuid>*``)."""
    base = Path(path).name.split(".")[0]
    return {str(p) for p in Path(path).parent.iterdir() if p.name.startswith(base)}


def delete_snapshot(agent: Agent, snapshot_id: str, strategy: str = "auto") -> dict[str, Any]:
    task = agent.client.request("DELETE", f"/v1/snapshots/{snapshot_id}?strategy={strategy}")
    return wait_task(agent, task["task"]["id"])


def backing_path(path: str) -> str | None:
    """The file qcow2 overlay PATH backs onto (None: none), as QEMU spells
    it: a relative pointer joined to PATH's directory as given, which is how
    libvirt and gasnap's records name it too (a symlinked directory stays
    the link)."""
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
        check=True, capture_output=True, text=True).stdout)
    backing = info.get("full-backing-filename")
    return os.path.normpath(backing) if backing else None


def image_digest(path: str, fmt: str) -> str:
    """sha256 of an image's content as the guest would read it (whole chain)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(raw)],
                       check=True)
        digest = hashlib.sha256()
        with raw.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def record_digest(rec: dict[str, Any]) -> str:
    """image_digest of a snapshot's image, in the format its overlay records."""
    return image_digest(rec["image"], str(read_qcow2_header(rec["file"]).backing_format))


async def active_digest(hv: Any, domain: str, target: str = "vda") -> str:
    """image_digest of the disk as the running guest sees it (synced first)."""
    await sh(hv, domain, "sync")
    vol = (await hv.get_domain(domain)).volume(target)
    assert vol is not None
    return image_digest(vol.active_file, vol.format)
