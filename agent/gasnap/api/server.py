"""Running the app: unix socket (default, mode 0660) or TCP, until signalled."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from aiohttp import web

from ..config import Settings
from ..errors import ConfigError
from .app import create_app

log = logging.getLogger(__name__)


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
    else:
        raise ConfigError(f"another agent already listens on {path}")
    finally:
        probe.close()


async def serve(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if settings.listen.startswith("unix:"):
        path = Path(settings.listen.removeprefix("unix:"))
        _prepare_socket(path)
        site = web.UnixSite(runner, str(path))
        await site.start()
        os.chmod(path, 0o660)
    else:
        host, _, port = settings.listen.removeprefix("tcp:").rpartition(":")
        site = web.TCPSite(runner, host or "127.0.0.1", int(port))
        await site.start()
    log.info("gasnap agent listening on %s", settings.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gasnap agent stopping")
        await runner.cleanup()
