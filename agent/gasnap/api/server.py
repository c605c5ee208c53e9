"""Running the agent's app until signalled."""

from __future__ import annotations

import logging

from ..config import Settings, missing_domains
from ..errors import ConfigError, Unavailable
from ..httpkit import run_app, server_tls, warn_plain_tokens
from ..runtime import open_hypervisor
from .app import create_app
from .keys import SERVICE

log = logging.getLogger(__name__)


async def check_schedules(settings: Settings, *, strict: bool) -> None:
    """Every domain a schedule names should exist.  STRICT (--check-config):
    libvirt must answer and a missing domain is an error.  Otherwise (the
    agent starting) each is a warning: a domain undefined since the
    configuration was written fails that schedule's runs alone
    (``domain_not_found``), and an unreachable libvirtd postpones the check.
    Runs in the caller's loop: libvirt's event loop is bound to the first
    loop that connects, for the life of the process."""
    if not settings.schedules:
        return
    hv = open_hypervisor(settings)
    try:
        missing = missing_domains(settings, await hv.domain_names())
    except Unavailable:
        if strict:
            raise
        log.warning("libvirt unreachable: the domains of the schedules are not checked yet")
        return
    finally:
        await hv.close()
    if missing and strict:
        raise ConfigError("; ".join(missing))
    for problem in missing:
        log.warning("%s: that schedule's runs will fail until it exists", problem)


async def serve(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    await check_schedules(settings, strict=False)
    app = create_app(settings)

    async def recovered() -> None:
        # The service exists only once the runner has set the app up.
        await app[SERVICE].ready.wait()

    tls = server_tls(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    warn_plain_tokens(settings.listen, tls is not None, "gasnap agent")
    # Ready for systemd once the API listens and recovery has settled the journal.
    await run_app(app, settings.listen, "gasnap agent", ready=recovered, tls=tls)
