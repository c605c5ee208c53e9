"""Stopping and starting libvirtd the way this host runs it.

A systemd host runs libvirtd as a unit (socket-activated or not): there it is
stopped and started with systemctl, as an operator's restart or a package
upgrade does.  A host without systemd as PID 1 (HOST.md's recipe) runs it as
a plain daemon: SIGTERM, then ``libvirtd -d``.  Either way the tests run; no
test skips on the production setup.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

UNITS = ("libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket",
         "libvirtd-admin.socket")


def systemd_managed() -> bool:
    if not os.path.exists("/run/systemd/system") or shutil.which("systemctl") is None:
        return False
    state = subprocess.run(["systemctl", "is-active", "libvirtd.service"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return state in ("active", "activating")


def pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else None


def stop() -> bool:
    """Stop libvirtd; returns whether systemd runs it (pass it to ``start``)."""
    managed = systemd_managed()
    if managed:
        # The sockets too, or the first client would start it again at once.
        subprocess.run(["systemctl", "stop", *UNITS], check=True)
        return True
    running = pid()
    assert running is not None, "no libvirtd to stop"
    os.kill(running, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid() is not None:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    return False


def start(managed: bool) -> None:
    """Start libvirtd again and wait until it answers.  A plain daemon is
    started on CPU 0, as scripts/setup.sh starts it: libvirt keys its cache
    of QEMU's capabilities on the CPUID of the CPU it starts on, and this
    host's vCPUs differ, so a start elsewhere probed QEMU again (8 s before
    the first answer, every other restart).  libvirt gives QEMU all CPUs."""
    if managed:
        subprocess.run(["systemctl", "start", *UNITS], check=True)
    elif pid() is None:
        subprocess.run(["taskset", "-c", "0", "libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["virsh", "-q", "-c", "qemu:///system", "version"],
                         capture_output=True, check=False).returncode != 0:
        assert time.monotonic() < deadline, "libvirtd did not come back"
        time.sleep(0.1)
