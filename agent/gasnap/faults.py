"""Fault injection for tests only: die at a named step, as a crash would.

Set ``GASNAP_TEST_FAULT=<point>`` in the agent's environment (for example
``create:overlays``) and the agent SIGKILLs itself when it reaches that point;
``<point>:stop`` SIGSTOPs it instead (a hung agent).  Unset, every call is a
no-op.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "GASNAP_TEST_FAULT"
_fault = os.environ.get(ENV)


def hit(point: str) -> None:
    if _fault is None or not _fault.startswith(point):
        return
    if _fault == point:
        log.critical("fault injection: killing the agent at %s", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    elif _fault == f"{point}:stop":
        log.critical("fault injection: stopping the agent at %s", point)
        os.kill(os.getpid(), signal.SIGSTOP)
