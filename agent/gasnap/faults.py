"""Fault injection for tests only: die at a named step, as a crash would.

Set ``GASNAP_TEST_FAULT=<point>`` in the agent's environment (for example
``create:overlays``) and the agent SIGKILLs itself when it reaches that point.
Unset, every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "GASNAP_TEST_FAULT"
_ARMED = os.environ.get(ENV)


def hit(point: str) -> None:
    if point == _ARMED:
        log.critical("fault injection: killing the agent at %s", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
