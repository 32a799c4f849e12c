"""x86_64 guests: QEMU's pc machine, 8250 serial console, RAM from 0."""

from . import Arch

ARCH = Arch(
    name="x86_64",
    debian_arch="amd64",
    qemu_binary="qemu-system-x86_64",
    machine_args=("-M", "pc"),
    default_cpu="max,la57=off",   # 4-level paging, like most machines; la57=on for 5-level
    console="ttyS0",
    ram_base=0,
)
