#!/usr/bin/env python3
"""Tracer throughput, side by side in one run: qemuleak's tracer and a gdb Python
breakpoint tracer (tools/gdb_tracer.py) on the same breakpoints, same guest image,
same workload (allocstorm running without end on an x86_64 TCG guest, 2 vCPUs).

    .venv/bin/python tools/bench_trace.py [--seconds 40]

For each: allocations traced per second over the window.
"""

import argparse
import os
import signal
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
from qemuleak.session import unwinding  # noqa: E402
from qemuleak.tracer import Tracer, tracing  # noqa: E402

FREE_ARG = {"kfree": "rdi", "vfree": "rdi", "kmem_cache_free": "rsi"}


def start_storm(vm: VM) -> None:
    vm.send_line("insmod /modules/allocstorm.ko count=1000000000")
    vm.wait_for_line("allocstorm: started", timeout=60)


def run_qemuleak(vm: VM, image, seconds: float) -> tuple[float, int]:
    """(seconds traced, allocations traced)."""
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
        kernel = Kernel.open(guest, system_map=image.system_map)
        tracer = Tracer(kernel, ObjectTable(), **unwinding(kernel))
        start = time.monotonic()
        with tracing(tracer):
            tracer.run(lambda: time.monotonic() - start >= seconds)
        elapsed = time.monotonic() - start
        guest.was_running = True
    return elapsed, tracer.stats.allocs


def run_gdb(vm: VM, image, seconds: float) -> tuple[float, int]:
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
        start = time.monotonic()
        gdb.write("-exec-continue", timeout_sec=1, raise_error_on_timeout=False)
        while time.monotonic() - start < seconds:
            gdb.get_gdb_response(timeout_sec=0.5, raise_error_on_timeout=False)
        elapsed = time.monotonic() - start
        gdb.gdb_process.send_signal(signal.SIGINT)     # as Ctrl-C would
        gdb.get_gdb_response(timeout_sec=10, raise_error_on_timeout=False)
        out = gdb.write("python print('COUNTS', COUNTS['allocs'])", timeout_sec=30)
        allocs = next(int(r["payload"].split()[1]) for r in out
                      if r.get("type") == "console" and "COUNTS" in (r.get("payload") or ""))
        gdb.write("delete", timeout_sec=30)
        gdb.write("detach", timeout_sec=30)
    finally:
        gdb.exit()
    return elapsed, allocs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0, help="tracing window per tracer")
    args = ap.parse_args()
    image = find_image("x86_64")
    print(f"x86_64 TCG guest, 2 vCPUs, allocstorm running; {args.seconds:.0f} s per tracer",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = initramfs.compose(image.base_initramfs, Path(tmp) / "initrd.gz",
                                   initramfs.module_files([image.module("allocstorm")]))
        with VM(VMConfig(kernel=image.kernel, initrd=initrd, smp=2, gdb="tcp")) as vm:
            vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
            start_storm(vm)
            results = {}
            for name, fn in (("qemuleak", run_qemuleak), ("gdb python", run_gdb)):
                elapsed, allocs = results[name] = fn(vm, image, args.seconds)
                print(f"  {name:11} {allocs:6} allocations traced in {elapsed:5.1f} s: "
                      f"{allocs / elapsed:7.1f} allocs/s", flush=True)
    (qe, qa), (ge, ga) = results["qemuleak"], results["gdb python"]
    print(f"  qemuleak / gdb: {(qa / qe) / max(ga / ge, 1e-9):.1f}x the traced allocations per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
