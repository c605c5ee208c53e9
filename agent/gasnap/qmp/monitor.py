"""QEMU over its QMP socket (``NAME.qmp``), with qemu.qmp's client.

What a bare-QEMU domain is, read from QEMU itself and never guessed: its
run state (``query-status``), its UUID, its RAM, and each disk's device id
(the target), serial (``qom-get`` on the device) and chain, every layer
with the format QEMU opened it with (``query-block``'s image tree).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from ..errors import GasnapError, NotFound, Unavailable
from ..hypervisor import AgentState, Domain, DomainState, Layer, Volume

CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0

_STATES = {"running": DomainState.RUNNING, "paused": DomainState.PAUSED,
           "suspended": DomainState.PMSUSPENDED, "shutdown": DomainState.SHUTDOWN,
           "guest-panicked": DomainState.CRASHED, "internal-error": DomainState.CRASHED}


class QmpError(GasnapError):
    code = "qmp"


class QmpDomainNotFound(QmpError, NotFound):
    code = "domain_not_found"


class QmpUnavailable(QmpError, Unavailable):
    code = "qmp_unavailable"


class Monitor:
    """One QMP session with one domain's QEMU (``async with``)."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.path = run_dir / f"{name}.qmp"
        self._client = QMPClient(f"gasnap-{name}")

    async def __aenter__(self) -> Monitor:
        if not self.path.exists():
            raise QmpDomainNotFound(f"no domain {self.name}: no {self.path}")
        try:
            await asyncio.wait_for(self._client.connect(str(self.path)), CONNECT_TIMEOUT)
        except (OSError, QMPError, TimeoutError) as err:
            raise QmpUnavailable(f"{self.name}: QEMU does not answer on {self.path} "
                                 f"({err})") from err
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._client.disconnect()

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        what = f"{self.name}: {command}"
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments),
                                          CALL_TIMEOUT)
        except ExecuteError as err:
            raise QmpError(f"{what}: {err.error.error.desc}") from err
        except (QMPError, TimeoutError) as err:
            raise QmpUnavailable(f"{what}: {err or 'no answer'}") from err


async def read_domain(run_dir: Path, name: str, agent: AgentState) -> Domain:
    """NAME as its QEMU sees it now (AGENT: what the caller found of qemu-ga)."""
    async with Monitor(run_dir, name) as qmp:
        status = await qmp.call("query-status")
        uuid = (await qmp.call("query-uuid"))["UUID"]
        memory = (await qmp.call("query-memory-size-summary"))["base-memory"]
        volumes = []
        for block in await qmp.call("query-block"):
            inserted = block.get("inserted")
            target = _target(block.get("qdev", ""))
            if inserted is None or target is None:
                continue  # an empty drive, or not a device gasnap knows how to name
            serial = await qmp.call("qom-get", {"path": block["qdev"], "property": "serial"})
            volumes.append(Volume(serial or f"{name}/{target}", target, serial or None, "file",
                                  _chain(inserted["image"]),
                                  readonly=bool(inserted.get("ro"))))
    state = _STATES.get(status["status"], DomainState.NOSTATE)
    return Domain(name, uuid, state, agent, tuple(sorted(volumes, key=lambda v: v.target)),
                  memory=int(memory))


def _target(qdev: str) -> str | None:
    """The device id of ``/machine/peripheral/ID/virtio-backend``: the target."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    return None


def _chain(image: dict[str, Any]) -> tuple[Layer, ...]:
    """Active layer first, each with the format QEMU opened it with."""
    layers = []
    node: dict[str, Any] | None = image
    while node is not None:
        layers.append(Layer(str(node["filename"]), str(node["format"])))
        node = node.get("backing-image")
    return tuple(layers)
