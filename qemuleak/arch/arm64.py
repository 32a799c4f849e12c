"""arm64 guests: QEMU's virt machine, PL011 console, RAM from 0x40000000."""

from . import Arch

ARCH = Arch(
    name="arm64",
    debian_arch="arm64",
    qemu_binary="qemu-system-aarch64",
    machine_args=("-M", "virt"),
    default_cpu="cortex-a57",
    console="ttyAMA0",
    ram_base=0x40000000,
    kbuild_args=("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"),
)
