"""``gasnap doctor``: is this host ready for gasnap?  One result per check."""

from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import qemuimg
from .errors import GasnapError
from .hypervisor import AgentState, DomainState
from .virt import LibvirtHypervisor


class CheckStatus(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: CheckStatus
    detail: str

    def to_record(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status.value.lower(), "detail": self.detail}


async def _qemu_img() -> Check:
    try:
        return Check("qemu-img", CheckStatus.OK, await qemuimg.version())
    except GasnapError as err:
        return Check("qemu-img", CheckStatus.FAIL, err.message)


def _state_dir(path: Path) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as err:
        return Check("state dir", CheckStatus.FAIL, f"{path}: {err.strerror}")
    return Check("state dir", CheckStatus.OK, f"{path} writable")


async def _guests(hv: LibvirtHypervisor) -> list[Check]:
    checks = []
    for dom in await hv.list_domains(probe_agent=True):
        name = f"guest agent {dom.name}"
        if dom.state is not DomainState.RUNNING:
            checks.append(Check(name, CheckStatus.OK, f"{dom.state.value}: not checked"))
        else:
            checks.append(Check(name, *_AGENT_VERDICTS[dom.guest_agent]))
    return checks


_AGENT_VERDICTS = {
    AgentState.CONNECTED: (CheckStatus.OK, "connected: snapshots are filesystem-consistent"),
    AgentState.ABSENT: (CheckStatus.WARN, "absent: snapshots will be crash-consistent"),
    AgentState.UNRESPONSIVE: (CheckStatus.FAIL, "unresponsive: quiesced snapshots will fail"),
}


async def run_checks(libvirt_uri: str, state_dir: Path) -> list[Check]:
    checks = [await _qemu_img(), _state_dir(state_dir)]
    if os.geteuid() != 0:
        checks.append(Check("privileges", CheckStatus.WARN,
                            "not root: image files may be unreadable"))
    hv = LibvirtHypervisor(libvirt_uri)
    try:
        await hv.connect()
        version = await hv.connection.call(lambda c: c.getLibVersion(), what="libvirt version")
        major, minor = version // 1_000_000, version // 1000 % 1000
        detail = f"{libvirt_uri} reachable (libvirt {major}.{minor})"
        checks.append(Check("libvirtd", CheckStatus.OK, detail))
        checks.extend(await _guests(hv))
    except GasnapError as err:
        checks.append(Check("libvirtd", CheckStatus.FAIL, err.message))
    finally:
        await hv.close()
    return checks
