"""Disposable lab guests: persistent TCG domains with ext4 data disks and qemu-ga.

Each data disk is laid out as Nova attaches a Cinder volume: a qcow2 (or,
with ``disk_format="raw"``, raw) file ``volume-<uuid>`` whose ``<serial>``
is that uuid.  Lab domains carry a
metadata element so that ``lab list``/``lab down`` never touch a domain that
gasnap did not create.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .. import qemuimg
from ..errors import BadRequest, Conflict, GasnapError, NotFound
from ..guestagent import GuestAgent, GuestAgentError
from ..hypervisor import Domain, DomainState
from ..virt import DomainNotFound, LibvirtHypervisor
from . import domains
from .image import LabImage, ensure_image
from .workload import sh

log = logging.getLogger(__name__)

DEFAULT_LAB_DIR = Path("/var/lib/gasnap/lab")
LAB_NS = "urn:gasnap:lab:1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_DISKS = 16
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core host; measured: ~8 s idle
MEMORY_MIB = 256


class LabError(GasnapError):
    code = "lab"


class LabGuestNotFound(LabError, NotFound):
    code = "lab_guest_not_found"


class NotALabGuest(LabError, Conflict):
    code = "not_a_lab_guest"


class LabBootTimeout(LabError):
    code = "lab_boot_timeout"


# --- disks -----------------------------------------------------------------


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")


async def make_data_disk(directory: Path, size_mib: int, fmt: str = "qcow2"
                         ) -> tuple[str, Path]:
    """A ``volume-<uuid>`` of FMT holding a fresh ext4; returns (uuid, path)."""
    volume_uuid = str(uuid.uuid4())
    path = directory / f"volume-{volume_uuid}"
    raw = directory / f".{path.name}.raw"
    with raw.open("wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    try:
        # Eager init: no lazy-init writes in the guest to blur test results.
        await _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   str(raw))
        if fmt == "raw":
            raw.rename(path)
        else:
            await qemuimg.run("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    finally:
        raw.unlink(missing_ok=True)
    return volume_uuid, path


# --- domain XML ------------------------------------------------------------


def domain_xml(name: str, image: LabImage, disks: list[tuple[str, Path]],
               console_log: Path, *, agent: bool = True, disk_format: str = "qcow2") -> str:
    cmdline = f"console=ttyS0 panic=-1 quiet gasnap.disks={len(disks)}"
    if not agent:
        cmdline += " gasnap.agent=off"
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'/>
      <source file={quoteattr(str(path))}/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
      <serial>{escape(serial)}</serial>
    </disk>"""
        for i, (serial, path) in enumerate(disks)
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <metadata><gasnap:lab xmlns:gasnap='{LAB_NS}' disks='{len(disks)}'/></metadata>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# --- the lab ---------------------------------------------------------------


def lab_home() -> Path:
    """Where lab guests' files live: ``GASNAP_LAB_DIR``, read when a lab is
    made (the tests put it behind a symlink), else the default."""
    return Path(os.environ.get("GASNAP_LAB_DIR") or DEFAULT_LAB_DIR)


class Lab:
    def __init__(self, hypervisor: LibvirtHypervisor, lab_dir: Path | None = None) -> None:
        self.hv = hypervisor
        self.lab_dir = lab_dir or lab_home()

    async def is_lab_guest(self, name: str) -> bool:
        try:
            return await domains.metadata(self.hv.connection, name, LAB_NS) is not None
        except DomainNotFound:
            return False

    async def names(self) -> list[str]:
        names = await self.hv.domain_names()
        flags = await asyncio.gather(*(self.is_lab_guest(n) for n in names))
        return [n for n, is_lab in zip(names, flags, strict=True) if is_lab]

    async def list(self) -> list[Domain]:
        return [await self.hv.get_domain(n, probe_agent=True) for n in await self.names()]

    async def up(self, name: str, *, disks: int = 1, size_mib: int = 128,
                 agent: bool = True, timeout: float = BOOT_TIMEOUT,
                 disk_format: str = "qcow2") -> Domain:
        """Create and boot NAME, or boot it if it already exists; return its
        record once the guest agent answers."""
        _validate(name, disks, size_mib)
        if disk_format not in ("qcow2", "raw"):
            raise BadRequest(f"--disk-format must be qcow2 or raw, not {disk_format!r}")
        if name in await self.hv.domain_names():
            if not await self.is_lab_guest(name):
                raise NotALabGuest(f"domain {name} exists and is not a lab guest")
            dom = await self.hv.get_domain(name)
            if dom.state is DomainState.SHUTOFF:
                await self.hv.start(name)
        else:
            await self._create(name, disks, size_mib, agent, disk_format)
        if agent:
            await self.wait_for_agent(name, timeout)
        return await self.hv.get_domain(name, probe_agent=True)

    async def _create(self, name: str, disks: int, size_mib: int, agent: bool,
                      disk_format: str) -> None:
        image = await ensure_image()
        directory = self.lab_dir / name
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of a failed up
        directory.mkdir(parents=True)
        try:
            made = await asyncio.gather(*(make_data_disk(directory, size_mib, disk_format)
                                          for _ in range(disks)))
            xml = domain_xml(name, image, list(made), directory / "console.log", agent=agent,
                             disk_format=disk_format)
            await domains.define_and_start(self.hv.connection, xml)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("lab guest %s defined with %d disk(s)", name, disks)

    async def wait_for_agent(self, name: str, timeout: float) -> None:
        await wait_for_agent(self.hv.agent, name, timeout,
                             self.lab_dir / name / "console.log")

    async def reboot(self, name: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Reboot NAME cleanly and return once its new boot answers."""
        boot_id = await sh(self.hv, name, "cat /proc/sys/kernel/random/boot_id")
        await domains.reboot(self.hv.connection, name)
        deadline = time.monotonic() + timeout
        while True:
            await self.wait_for_agent(name, max(1.0, deadline - time.monotonic()))
            try:
                rebooted = await sh(self.hv, name, "cat /proc/sys/kernel/random/boot_id") != boot_id
            except GuestAgentError:
                rebooted = False  # the old boot going down, or the new one coming up
            if rebooted:
                return
            if time.monotonic() >= deadline:
                raise LabBootTimeout(f"{name} did not reboot within {timeout:.0f}s")
            await asyncio.sleep(0.5)

    async def down(self, name: str) -> None:
        """Destroy and undefine NAME and remove its files."""
        if name not in await self.hv.domain_names():
            directory = self.lab_dir / name
            if not directory.is_dir():
                raise LabGuestNotFound(f"no lab guest {name}")
        elif not await self.is_lab_guest(name):
            raise NotALabGuest(f"domain {name} is not a lab guest; refusing to remove it")
        else:
            await self.hv.destroy(name)
            await domains.undefine(self.hv.connection, name)
        shutil.rmtree(self.lab_dir / name, ignore_errors=True)
        log.info("lab guest %s removed", name)


def _validate(name: str, disks: int, size_mib: int) -> None:
    if not NAME_RE.match(name):
        raise BadRequest(f"invalid lab guest name {name!r}")
    if not 1 <= disks <= MAX_DISKS:
        raise BadRequest(f"--disks must be between 1 and {MAX_DISKS}")
    if not 16 <= size_mib <= 1024 * 1024:
        raise BadRequest("--size must be between 16 and 1048576 MiB")


async def wait_for_agent(agent: GuestAgent, name: str, timeout: float, console: Path) -> None:
    """Until NAME's guest agent answers a ping (bounded), whatever the backend."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await agent.ping(name, timeout=2.0)
            return
        except GuestAgentError as err:
            if time.monotonic() >= deadline:
                raise LabBootTimeout(f"{name}: guest agent did not answer within "
                                     f"{timeout:.0f}s (console: {console})") from err
        await asyncio.sleep(0.5)
