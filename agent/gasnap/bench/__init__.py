"""``make bench``: gasnap side by side with libvirt and qemu-img, in one run."""
