"""systemd's readiness protocol (``Type=notify``), without libsystemd.

One datagram to ``$NOTIFY_SOCKET``; outside systemd the variable is unset
and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send STATE (``READY=1``, ``STOPPING=1``, ``STATUS=...``); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("cannot notify systemd (%s): %s", address, err)
        return False
    return True
