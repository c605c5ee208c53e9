"""The libvirt backend: ``gasnap.hypervisor.Hypervisor`` on libvirt.

``connection`` holds the one connection and the one ``call`` path (threads,
reconnects, error mapping); ``backend`` implements the hypervisor interface;
``agent`` is qemu-ga's transport through libvirt's channel.  Nothing outside
this package imports ``libvirt`` but the lab and the benchmarks' baselines.
"""

from .backend import LibvirtHypervisor
from .connection import (
    DomainChanged,
    DomainNotFound,
    DomainNotRunning,
    LibvirtUnavailable,
    VirtError,
)

__all__ = [
    "DomainChanged",
    "DomainNotFound",
    "DomainNotRunning",
    "LibvirtHypervisor",
    "LibvirtUnavailable",
    "VirtError",
]
