"""Metadata calls made after the disks changed: they must land, however long
the metadata service is away.  The journal holds the operation meanwhile, so
a restart repeats them (every call is idempotent)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_PAUSE = 1.0
MAX_PAUSE = 30.0


async def until_recorded(call: Callable[[], Awaitable[T]], what: str) -> T:
    """CALL until it succeeds; only an unreachable service is waited out
    (the client's own retries run inside each attempt)."""
    pause = FIRST_PAUSE
    while True:
        try:
            return await call()
        except Unavailable as err:
            log.warning("%s: %s; the disks already changed, so retrying in %.0fs",
                        what, err.message, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE)
