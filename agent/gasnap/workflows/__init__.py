"""Workflows: the steps of create, delete and recovery, over the boundaries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..freezeguard import FreezeGuard
from ..guestagent import GuestAgent
from ..hypervisor import Hypervisor
from ..journal import Journal
from ..metadata import MetadataService
from ..spares import Spares
from .windows import Windows

ProgressSink = Callable[[int], Awaitable[None]]  # a task's progress, 0-100


async def no_progress(_percent: int) -> None:
    """A sink for work no caller watches (recovery, retention)."""


@dataclass(frozen=True)
class Context:
    """What a workflow may use."""

    hv: Hypervisor
    agent: GuestAgent
    metadata: MetadataService
    journal: Journal
    guard: FreezeGuard
    freeze_timeout: float
    merge_bandwidth: int = 0  # MiB/s, 0: unlimited
    spares: Spares = field(default_factory=lambda: Spares(enabled=False))
    windows: Windows = field(default_factory=Windows)
