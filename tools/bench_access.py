#!/usr/bin/env python3
"""Guest access costs, side by side in one run on one guest.

    .venv/bin/python tools/bench_access.py [--arch x86_64] [--memory 512] [--seconds 5]

Boots the test guest with allocstorm running (a busy kernel), then measures:
- gdbstub round trip: `g` (all registers) and a 2 KiB `m` read;
- breakpoint stop cycles per second on kmem_cache_alloc: stop reply, `g`, PC
  past the ftrace NOP, `c` (the floor of any gdbstub tracer);
- guest RAM read throughput of each memory backend, as a ratio to the gdbstub's
  `m` packets (which read a sample only: they are slow).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import initramfs  # noqa: E402
from qemuleak.guest import Guest, measure_read  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402
from qemuleak.memory import GdbstubMem, ProcMem, SharedRam, hva_of_block  # noqa: E402


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def stop_cycles(guest: Guest, function: int, seconds: float) -> float:
    """Breakpoint stops per second on a busy function: stop reply, `g`, the PC
    moved past the ftrace NOP the breakpoint sits on (`P`), `c`. This is the floor
    of any gdbstub tracer: every traced call costs at least this one stop."""
    offset, length = guest.arch.entry_nop(guest.read(function, 16))
    return bare_stop_cycles(guest, {function + offset: function + offset + length}, seconds)


def bare_stop_cycles(guest: Guest, entries: dict[int, int], seconds: float) -> float:
    """Stops per second at breakpoints on `entries` (address -> where the guest goes
    on from it, past ftrace's NOP) with nothing done but the least a tracer must:
    the stop reply, `g`, the PC moved (`P`), `c`."""
    rsp, arch = guest.rsp, guest.arch
    reg = guest.register_by_name[arch.pc_reg]
    for address in entries:
        rsp.insert_breakpoint(address, arch.breakpoint_kind)
    try:
        stops, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            rsp.cont()
            stop = rsp.wait_stop(timeout=10)
            raw = rsp.read_registers(stop.thread)
            pc = int.from_bytes(raw[reg.offset:reg.offset + reg.bitsize // 8], "little")
            if pc in entries:
                guest.write_register(arch.pc_reg, entries[pc], stop.thread)
            stops += 1
        return stops / (time.perf_counter() - start)
    finally:
        for address in entries:
            rsp.remove_breakpoint(address, arch.breakpoint_kind)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--gdbstub-sample", type=int, default=16, help="MiB read through `m`")
    args = ap.parse_args()
    image = find_image(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = initramfs.compose(image.base_initramfs, Path(tmp) / "initrd.gz",
                                   initramfs.module_files([image.module("allocstorm")]))
        with VM(VMConfig(kernel=image.kernel, arch=args.arch, initrd=initrd, smp=2,
                         memory_mib=args.memory)) as vm:
            vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
            vm.send_line("insmod /modules/allocstorm.ko count=1000000000")
            vm.wait_for_line("allocstorm: started", timeout=60)
            with Guest.connect(vm.gdb_target) as guest:
                kernel = Kernel.open(guest, system_map=image.system_map)
                rsp = guest.rsp
                g_ms = per_call(rsp.read_registers, 2000) * 1e3
                rsp.set_physical_mode(True)
                base = guest.ranges[0].gpa
                m_ms = per_call(lambda: rsp.read_memory(base + 0x100000, 2048), 2000) * 1e3
                stops = stop_cycles(guest, kernel.sym("kmem_cache_alloc"), args.seconds)

                total = guest.ram_size()
                shared = SharedRam(vm.ram_fd_path(), guest.ranges)
                proc = ProcMem(vm.pid, hva_of_block(rsp, guest.ranges), guest.ranges)
                stub = GdbstubMem(rsp, guest.ranges)
                t = time.perf_counter()
                shared_bps = measure_read(shared, total)
                shared_s = time.perf_counter() - t
                shared_warm = statistics.median(measure_read(shared, total) for _ in range(3))
                proc_bps = measure_read(proc, total)
                stub_bps = measure_read(stub, args.gdbstub_sample << 20, chunk=64 << 10)
                shared.close()
                proc.close()

    mb = 1e6
    print(f"guest: {args.arch}, {args.memory} MiB, 2 vCPUs, TCG, allocstorm running")
    print(f"gdbstub round trip: g {g_ms:.3f} ms, m 2 KiB {m_ms:.3f} ms")
    print(f"breakpoint stop cycles (kmem_cache_alloc; stop, g, P, c): {stops:,.0f}/s "
          f"({1e3 / stops:.3f} ms each)")
    print(f"RAM read, whole guest ({total >> 20} MiB) unless noted:")
    print(f"  shared-ram  {shared_bps / mb:8.0f} MB/s cold ({shared_s:.2f} s), "
          f"{shared_warm / mb:.0f} MB/s warm   {shared_bps / stub_bps:6.1f}x gdbstub")
    print(f"  proc-mem    {proc_bps / mb:8.0f} MB/s                 {proc_bps / stub_bps:6.1f}x gdbstub")
    print(f"  gdbstub     {stub_bps / mb:8.1f} MB/s ({args.gdbstub_sample} MiB sample)   1.0x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
