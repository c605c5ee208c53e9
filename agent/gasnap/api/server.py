"""Running the agent's app until signalled."""

from __future__ import annotations

import logging

from ..config import Settings, check_domains
from ..errors import Unavailable
from ..httpkit import run_app
from ..runtime import open_hypervisor
from .app import create_app
from .keys import SERVICE

log = logging.getLogger(__name__)


async def check_schedules(settings: Settings, *, strict: bool) -> None:
    """Every domain a schedule names must exist.  STRICT (--check-config):
    libvirt must answer; otherwise an unreachable libvirtd only postpones the
    check.  Runs in the caller's loop: libvirt's event loop is bound to the
    first loop that connects, for the life of the process."""
    if not settings.schedules:
        return
    hv = open_hypervisor(settings)
    try:
        check_domains(settings, await hv.domain_names())
    except Unavailable:
        if strict:
            raise
        log.warning("libvirt unreachable: the domains of the schedules are not checked yet")
    finally:
        await hv.close()


async def serve(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    await check_schedules(settings, strict=False)
    app = create_app(settings)

    async def recovered() -> None:
        # The service exists only once the runner has set the app up.
        await app[SERVICE].ready.wait()

    # Ready for systemd once the API listens and recovery has settled the journal.
    await run_app(app, settings.listen, "gasnap agent", ready=recovered)
