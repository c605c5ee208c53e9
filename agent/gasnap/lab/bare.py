"""Lab guests as bare QEMU processes, laid out as the QMP backend finds them.

``gasnap lab up NAME --backend qmp`` starts the lab image with no libvirt:
one TCG ``qemu-system-x86_64`` daemon, its QMP socket ``RUN_DIR/NAME.qmp``,
its guest agent's socket ``RUN_DIR/NAME.qga`` and its pid file
``RUN_DIR/NAME.pid``, data disks as libvirt lab guests have them
(``volume-<uuid>``, serial = uuid).  Each process carries the mark
``process=gasnap-lab-NAME`` in its ``-name``: a process without it is never
signalled, whatever its pid file says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import BadRequest
from ..guestagent import GuestAgent
from ..qmp.qga import QgaChannel
from .guests import (
    BOOT_TIMEOUT,
    MEMORY_MIB,
    LabError,
    LabGuestNotFound,
    NotALabGuest,
    _validate,
    lab_home,
    make_data_disk,
    wait_for_agent,
)
from .image import LabImage, ensure_image

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("GASNAP_QMP_RUN_DIR", "/run/gasnap/qemu"))
STOP_WAIT = 15.0  # seconds a guest has to go after SIGTERM, before SIGKILL


def mark(name: str) -> str:
    return f"process=gasnap-lab-{name}"


def qemu_argv(name: str, image: LabImage, disks: list[tuple[str, Path]], fmt: str, *,
              run_dir: Path, console: Path) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-name", f"{name},{mark(name)}", "-machine", "pc,accel=tcg",
        # A UUID per start, as libvirt gives one: a name taken over by another
        # QEMU is then told apart from the guest a plan read.
        "-uuid", str(uuid.uuid4()),
        "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-display", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 panic=-1 quiet gasnap.disks={len(disks)}",
        "-serial", f"file:{console}",
        "-chardev", f"socket,id=qmp,path={run_dir / f'{name}.qmp'},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=qga,path={run_dir / f'{name}.qga'},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        "-daemonize", "-pidfile", str(run_dir / f"{name}.pid"),
    ]
    for i, (serial, path) in enumerate(disks):
        target = f"vd{chr(ord('a') + i)}"
        # Formats named, node names stable: the backend reads chains by them.
        argv += ["-blockdev", f"driver=file,filename={path},node-name=file-{target}",
                 "-blockdev", f"driver={fmt},file=file-{target},node-name={target}-0",
                 "-device", f"virtio-blk-pci,drive={target}-0,serial={serial},id={target}"]
    return argv


class BareLab:
    def __init__(self, run_dir: Path = RUN_DIR, lab_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.lab_dir = lab_dir or lab_home()
        self.agent = GuestAgent(QgaChannel(run_dir))

    def pid_of(self, name: str) -> int | None:
        """The pid of NAME's QEMU when it runs and carries our mark; else None."""
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if f"{name},{mark(name)}".encode() in cmdline else None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.run_dir.glob("*.pid") if self.pid_of(p.stem))

    async def up(self, name: str, *, disks: int = 1, size_mib: int = 128,
                 disk_format: str = "qcow2", timeout: float = BOOT_TIMEOUT
                 ) -> dict[str, Any]:
        """Start NAME (or find it running) and return once its agent answers:
        its record (pid, sockets, data disks)."""
        _validate(name, disks, size_mib)
        if disk_format not in ("qcow2", "raw"):
            raise BadRequest(f"--disk-format must be qcow2 or raw, not {disk_format!r}")
        if self.pid_of(name) is None:
            await self._start(name, disks, size_mib, disk_format)
        await self.wait_for_agent(name, timeout)
        return self.record(name)

    def record(self, name: str) -> dict[str, Any]:
        disks = sorted(str(p) for p in (self.lab_dir / name).glob("volume-*"))
        return {"name": name, "backend": "qmp", "pid": self.pid_of(name),
                "qmp": str(self.run_dir / f"{name}.qmp"),
                "qga": str(self.run_dir / f"{name}.qga"), "disks": disks}

    async def _start(self, name: str, disks: int, size_mib: int, fmt: str) -> None:
        if (self.run_dir / f"{name}.qmp").exists() and (self.run_dir / f"{name}.pid").exists():
            raise NotALabGuest(f"{self.run_dir / name}.pid names a process that is not "
                               "gasnap's lab guest; refusing to replace it")
        image = await ensure_image()
        directory = self.lab_dir / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            made = await asyncio.gather(*(make_data_disk(directory, size_mib, fmt)
                                          for _ in range(disks)))
            argv = qemu_argv(name, image, list(made), fmt, run_dir=self.run_dir,
                             console=directory / "console.log")
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()  # -daemonize: returns once QEMU runs
            if proc.returncode != 0:
                raise LabError(f"qemu-system-x86_64 failed: {err.decode(errors='replace')}")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("bare QEMU lab guest %s started with %d disk(s)", name, disks)

    async def wait_for_agent(self, name: str, timeout: float) -> None:
        await wait_for_agent(self.agent, name, timeout, self.lab_dir / name / "console.log")

    async def down(self, name: str) -> None:
        """Stop NAME's QEMU (ours only) and remove its sockets and files."""
        await asyncio.to_thread(self._down, name)
        log.info("bare lab guest %s removed", name)

    def _down(self, name: str) -> None:
        pid = self.pid_of(name)
        pidfile = self.run_dir / f"{name}.pid"
        if pid is None:
            try:
                other = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                other = None
            if other is not None and is_running(other):
                raise NotALabGuest(f"the process of {pidfile} is not gasnap's lab guest; "
                                   "refusing to stop it")
            if not (self.lab_dir / name).is_dir():
                raise LabGuestNotFound(f"no bare lab guest {name}")
        else:
            _stop(pid)
        for suffix in (".pid", ".qmp", ".qga"):
            (self.run_dir / f"{name}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.lab_dir / name, ignore_errors=True)


def _stop(pid: int) -> None:
    """SIGTERM (QEMU exits at once), SIGKILL if it has not after STOP_WAIT."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_running(pid):
        os.kill(pid, signal.SIGKILL)


def is_running(pid: int) -> bool:
    """PID is a live process (a zombie no init has reaped yet is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
