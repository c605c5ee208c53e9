"""gasnap: guest-assisted consistent live snapshots of libvirt/QEMU guests."""

__version__ = "0.1.0"
