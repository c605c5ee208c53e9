"""Workflows: the steps of create, delete and recovery, over the boundaries.

Each workflow is a plan (``createplan``, ``deleteplan``: checks, reads, and
changes nothing, raising when the request cannot be met) and an execution
(``create``, ``delete``), which writes every step to the journal before
taking it and reports how it ended in the outcome it returns (``failure``:
why it did not fully succeed), never by raising.  Workflows reach the
outside world only through the interfaces in ``Context``; no backend module
is imported here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..freezeguard import FreezeGuard
from ..guestagent import GuestAgent
from ..hypervisor import Hypervisor
from ..journal import Journal
from ..metadata import Limits, MetadataService
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
    shutdown_timeout: float = 120.0  # a forced revert's wait for a guest to power off
    detach_timeout: float = 60.0  # a clone's detach: the wait for the guest to let go
    min_free: int = 256 << 20  # bytes a create or merge must leave free ([limits])
    limits: Limits = field(default_factory=Limits)  # every volume's, unless its own
    # The records live in a metadata service other hosts may share: a volume
    # id must then be the disk's serial (a fallback domain/target is not
    # unique across hosts).
    shared_records: bool = False
    merge_converge_timeout: float = 600.0  # an active commit's bound without progress
