#!/usr/bin/env python3
"""`make demo`: boot the default x86_64 test guest, load leaky, and show what it
allocated, as the module announced it on the guest's console.

This grows into a real leak report as the tracer and scanner land.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import initramfs  # noqa: E402
from qemuleak.errors import QemuleakError  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402
from tests.groundtruth import LEAKY_LEAKS, parse_objects  # noqa: E402


def main() -> int:
    try:
        image = find_image("x86_64")
        with tempfile.TemporaryDirectory() as tmp:
            initrd = initramfs.compose(image.base_initramfs, Path(tmp) / "initrd.gz",
                                       initramfs.module_files([image.module("leaky")]))
            print(f"demo: booting Debian {image.release} under QEMU/TCG (2 vCPUs, 512 MiB)")
            t0 = time.monotonic()
            with VM(VMConfig(kernel=image.kernel, initrd=initrd, smp=2)) as vm:
                vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
                print(f"demo: guest ready in {time.monotonic() - t0:.1f} s, "
                      f"gdbstub at {vm.gdb_target}; insmod leaky.ko")
                vm.send_line("insmod /modules/leaky.ko")
                vm.wait_for_line("leaky: ready", timeout=60)
                objs = parse_objects(vm.console_text())
        print(f"\nleaky allocated {len(objs)} objects "
              "(leak reports arrive with the scanner; this is the ground truth):")
        print(f"  {'name':<16}{'address':<20}{'size':>6}  expected")
        for o in objs.values():
            kind = "leak" if o.name in LEAKY_LEAKS else "referenced"
            print(f"  {o.name:<16}0x{o.address:016x}  {o.size:>6}  {kind}")
        return 0
    except QemuleakError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
