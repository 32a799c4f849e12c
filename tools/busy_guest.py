"""The guest the scan benchmarks run on: the test image (2 vCPUs, TCG, shared-RAM
memfd) with leaky loaded and allocstorm allocating without end."""

from contextlib import contextmanager
from pathlib import Path

from qemuleak import initramfs
from qemuleak.launch import VM, VMConfig


@contextmanager
def busy_guest(image, arch: str, memory_mib: int, tmp: Path, append: str = "",
               spinner: bool = True):
    """Boot it, load leaky (without its spinning kthread if not `spinner`: that
    one keeps a vCPU busy for good), start allocstorm; yield the VM, shut it down
    after."""
    initrd = initramfs.compose(image.base_initramfs, tmp / f"initrd{memory_mib}.gz",
                               initramfs.module_files([image.module("leaky"),
                                                       image.module("allocstorm")]))
    with VM(VMConfig(kernel=image.kernel, arch=arch, initrd=initrd, smp=2,
                     memory_mib=memory_mib, append=append)) as vm:
        vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
        vm.send_line("insmod /modules/leaky.ko" + ("" if spinner else " spinner=0"))
        vm.wait_for_line("leaky: ready", timeout=60)
        vm.send_line("insmod /modules/allocstorm.ko count=1000000000")
        vm.wait_for_line("allocstorm: started", timeout=60)
        yield vm
