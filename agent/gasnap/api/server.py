"""Running the agent's app until signalled."""

from __future__ import annotations

import logging

from ..config import Settings
from ..httpkit import run_app
from .app import create_app

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    await run_app(create_app(settings), settings.listen, "gasnap agent")
