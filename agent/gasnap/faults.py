"""Fault injection for tests only: die, stop or stand still at a named step.

Set ``GASNAP_TEST_FAULT=<point>`` in the agent's environment (for example
``create:overlays``) and the agent SIGKILLs itself when it reaches that point;
``<point>:stop`` SIGSTOPs it instead (a hung agent).

``GASNAP_TEST_HOLD=<dir>`` lets one agent stand still at any point, chosen
while it runs: when ``<dir>/hold`` names the point reached, the agent writes
``<dir>/held`` and waits, its event loop included, until ``hold`` is removed.
Meanwhile a test breaks whatever it likes (libvirtd, the metadata service,
the guest agent, free space) and then lets the step go on into the fault.
The loop is blocked on purpose: nothing of the agent moves, as at a SIGSTOP,
and the fault is met by the step after the point, never before.

Unset, every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "GASNAP_TEST_FAULT"
HOLD_ENV = "GASNAP_TEST_HOLD"
HOLD_LIMIT = 600.0  # a test that forgot its hold does not leave an agent stuck for ever
_fault = os.environ.get(ENV)
_hold_dir = os.environ.get(HOLD_ENV)


def hit(point: str) -> None:
    if _hold_dir is not None:
        _hold(Path(_hold_dir), point)
    if _fault is None or not _fault.startswith(point):
        return
    if _fault == point:
        log.critical("fault injection: killing the agent at %s", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    elif _fault == f"{point}:stop":
        log.critical("fault injection: stopping the agent at %s", point)
        os.kill(os.getpid(), signal.SIGSTOP)


def _hold(directory: Path, point: str) -> None:
    hold = directory / "hold"
    try:
        wanted = hold.read_text().strip()
    except FileNotFoundError:
        return
    if wanted != point:
        return
    log.critical("fault injection: holding the agent at %s", point)
    (directory / "held").write_text(point)
    deadline = time.monotonic() + HOLD_LIMIT
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (directory / "held").unlink(missing_ok=True)
    log.critical("fault injection: released at %s", point)
