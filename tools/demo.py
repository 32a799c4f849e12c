#!/usr/bin/env python3
"""`make demo`: boot the default x86_64 test guest, trace the kernel's allocations
from outside while the leaky module loads, and show each object leaky announced
with what the tracer recorded for it: size, comm, pid and backtrace.

This grows into a real leak report as the scanner lands.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import initramfs  # noqa: E402
from qemuleak.errors import QemuleakError  # noqa: E402
from qemuleak.guest import Guest  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.kernel.modules import Symbolizer  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402
from qemuleak.objects import ObjectTable  # noqa: E402
from qemuleak.trace_cmd import unwinding  # noqa: E402
from qemuleak.tracer import Tracer, tracing  # noqa: E402
from tests.groundtruth import LEAKY_LEAKS, LEAKY_RCU_FREED, parse_objects  # noqa: E402


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
                print(f"demo: guest ready in {time.monotonic() - t0:.1f} s; attaching to its "
                      f"gdbstub and tracing while `insmod leaky.ko` runs")
                with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
                    kernel = Kernel.open(guest, system_map=image.system_map)
                    table = ObjectTable()
                    symbols = Symbolizer(kernel)
                    tracer = Tracer(kernel, table, **unwinding(kernel, symbols))
                    vm.send_line("insmod /modules/leaky.ko")
                    start = time.monotonic()
                    with tracing(tracer):
                        tracer.run(lambda: "leaky: ready" in vm.console_text()
                                   or time.monotonic() - start > 120)
                objs = parse_objects(vm.console_text())
        s = tracer.stats
        print(f"demo: traced {s.allocs} allocations, {s.frees} frees in "
              f"{time.monotonic() - start:.1f} s ({s.stops} breakpoint stops)\n")
        for o in objs.values():
            r = table.get(o.address)
            expect = "leak" if o.name in LEAKY_LEAKS else \
                "freed by RCU" if o.name in LEAKY_RCU_FREED else "referenced"
            print(f"{o.name} (expected: {expect}) at 0x{o.address:016x}, {o.size} bytes:")
            if r is None:
                print("    not traced")
                continue
            print(f"    comm \"{r.comm}\", pid {r.pid}, cpu {r.cpu}, jiffies {r.jiffies}")
            for pc in r.backtrace[:6]:
                print(f"    [<{pc:016x}>] {symbols.format(pc)}")
        print("\n(leak reports arrive with the scanner: for now, the tracer's record of "
              "every object, the ground truth next to it)")
        return 0
    except QemuleakError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
