#!/usr/bin/env python3
"""Tracer throughput, side by side in one run: qemuleak's tracer and a gdb Python
breakpoint tracer (tools/gdb_tracer.py) on the same breakpoints, same guest image,
same workload (allocstorm count=N on an x86_64 TCG guest, 2 vCPUs).

    .venv/bin/python tools/bench_trace.py [--count 600]

For each: traced allocations per second, and guest slowdown (allocstorm's own
run time traced / untraced).
"""

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pygdbmi.gdbcontroller import GdbController  # noqa: E402

from qemuleak import initramfs  # noqa: E402
from qemuleak.guest import Guest  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402
from qemuleak.objects import ObjectTable  # noqa: E402
from qemuleak.trace_cmd import unwinding  # noqa: E402
from qemuleak.tracer import Tracer, tracing  # noqa: E402

DONE = re.compile(r"allocstorm: done count=(\d+) kmalloc=(\d+) cache=(\d+) vmalloc=(\d+) ns=(\d+)")
FREE_ARG = {"kfree": "rdi", "vfree": "rdi", "kmem_cache_free": "rsi"}


def storm(vm: VM, count: int, timeout: float = 900):
    """Load allocstorm; the match of its done line (after waiting for it)."""
    vm.send_line(f"insmod /modules/allocstorm.ko count={count}")
    vm.wait_for_line("allocstorm: started", timeout=60)
    return vm.wait_for_line(DONE, timeout=timeout)


def unload(vm: VM) -> None:
    vm.send_line("rmmod allocstorm; echo unloaded-$((1+1))")
    vm.wait_for_line("unloaded-2", timeout=120)


def run_qemuleak(vm: VM, image, count: int) -> tuple[float, int, int]:
    """(seconds, allocations traced, allocstorm ns)."""
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
        kernel = Kernel.open(guest, system_map=image.system_map)
        tracer = Tracer(kernel, ObjectTable(), **unwinding(kernel))
        mark = len(vm.console_text())
        vm.send_line(f"insmod /modules/allocstorm.ko count={count}")
        start = time.monotonic()
        with tracing(tracer):
            tracer.run(lambda: DONE.search(vm.console_text(), mark) is not None)
        elapsed = time.monotonic() - start
        guest.was_running = True
    m = DONE.search(vm.console_text(), mark)
    vm._cursor = len(vm.console_text())
    return elapsed, tracer.stats.allocs, int(m.group(5))


def run_gdb(vm: VM, image, count: int) -> tuple[float, int, int]:
    with Guest.connect(vm.gdb_target) as guest:
        kernel = Kernel.open(guest, system_map=image.system_map)
        probes = []
        tracer = Tracer(kernel, ObjectTable())
        for address, probe in tracer.probes.items():
            if probe.role == "alloc" and probe.size_arg is not None:
                probes.append(f"{address:x}:alloc:{tracer.arch.arg_regs[probe.size_arg]}")
            elif probe.role == "alloc":
                probes.append(f"{address:x}:alloc:rdi")      # size read from the cache: skip
            elif probe.name in FREE_ARG:
                probes.append(f"{address:x}:free:{FREE_ARG[probe.name]}")
        env = {"QEMULEAK_PROBES": ",".join(probes),
               "QEMULEAK_CURRENT_TASK": str(kernel.sym("current_task")),
               "QEMULEAK_COMM_OFFSET": str(kernel.types.offsetof("struct task_struct", "comm"))}
        guest.was_running = False
    os.environ.update(env)
    host, port = vm.gdb_target.rsplit(":", 1)
    gdb = GdbController(["gdb", "--nx", "--quiet", "--interpreter=mi3"])
    try:
        gdb.write("-gdb-set pagination off", timeout_sec=5)
        gdb.write(f"-target-select remote {host}:{port}", timeout_sec=30)
        gdb.write(f"source {Path(__file__).with_name('gdb_tracer.py')}", timeout_sec=30)
        mark = len(vm.console_text())
        vm.send_line(f"insmod /modules/allocstorm.ko count={count}")
        start = time.monotonic()
        gdb.write("-exec-continue", timeout_sec=1, raise_error_on_timeout=False)
        while DONE.search(vm.console_text(), mark) is None:
            time.sleep(0.1)
            gdb.get_gdb_response(timeout_sec=0.1, raise_error_on_timeout=False)
        elapsed = time.monotonic() - start
        gdb.interrupt_gdb()
        gdb.get_gdb_response(timeout_sec=5, raise_error_on_timeout=False)
        out = gdb.write("python print('COUNTS', COUNTS['allocs'])", timeout_sec=10)
        allocs = next(int(r["payload"].split()[1]) for r in out
                      if r.get("type") == "console" and "COUNTS" in (r.get("payload") or ""))
        gdb.write("delete", timeout_sec=10)
        gdb.write("detach", timeout_sec=10)
    finally:
        gdb.exit()
    m = DONE.search(vm.console_text(), mark)
    return elapsed, allocs, int(m.group(5))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=600, help="allocstorm iterations per run")
    args = ap.parse_args()
    image = find_image("x86_64")
    with tempfile.TemporaryDirectory() as tmp:
        initrd = initramfs.compose(image.base_initramfs, Path(tmp) / "initrd.gz",
                                   initramfs.module_files([image.module("allocstorm")]))
        with VM(VMConfig(kernel=image.kernel, initrd=initrd, smp=2, gdb="tcp")) as vm:
            vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
            base_ns = int(storm(vm, args.count).group(5))
            unload(vm)
            results = {}
            for name, fn in (("qemuleak", run_qemuleak), ("gdb python", run_gdb)):
                results[name] = fn(vm, image, args.count)
                unload(vm)
    print(f"x86_64 TCG guest, 2 vCPUs, allocstorm count={args.count} "
          f"(untraced: {base_ns / 1e6:.2f} ms)")
    for name, (elapsed, allocs, ns) in results.items():
        print(f"  {name:11} {allocs:6} allocations traced in {elapsed:6.1f} s: "
              f"{allocs / elapsed:6.1f} allocs/s, guest slowdown {ns / base_ns:8.0f}x")
    q, g = results["qemuleak"], results["gdb python"]
    print(f"  qemuleak / gdb: {(q[1] / q[0]) / (g[1] / g[0]):.2f}x the traced allocations per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
