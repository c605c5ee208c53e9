"""The bare-QEMU backend's parts: QEMU reached over its QMP socket and the
guest agent over its own, with qemu.qmp (``[agent] hypervisor = "qmp"``)."""
