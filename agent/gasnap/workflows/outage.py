"""A hypervisor daemon restarting under a workflow (libvirtd upgraded, or
restarted by an operator): QEMU and its guests run on, so a step that met
the outage is taken again once the daemon answers, within the backend's
outage bound (``Hypervisor.reachable``).  Only steps that may be taken
twice go through here, and never one inside a freeze window, whose bound
is ``freeze_timeout``.  Any other service away (the metadata service) has
its own deadline and is not waited for here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..hypervisor import HypervisorUnavailable
from . import Context

log = logging.getLogger(__name__)

T = TypeVar("T")


async def ride_out(ctx: Context, what: str, step: Callable[[], Awaitable[T]]) -> T:
    """STEP, and once more after the hypervisor is back if it was away."""
    try:
        return await step()
    except HypervisorUnavailable as err:
        log.warning("%s: %s; waiting for the hypervisor to take it again", what, err.message)
    await ctx.hv.reachable()
    return await step()
