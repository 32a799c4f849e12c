#!/usr/bin/env python3
"""Scanner cost per guest size: how long the guest stands still for a snapshot,
how fast its RAM is copied, and how fast the copy is scanned after it resumed.

    .venv/bin/python tools/bench_scan.py [--arch x86_64] [--memory 512 2048] [--save DIR]
                                         [--scans 3] [--trace-seconds 5]

For each --memory size, boots the test guest (2 vCPUs, TCG, shared-RAM memfd) with
the leaky module loaded and allocstorm running without end (a busy kernel), traces
its allocations for --trace-seconds, lets it run again (with --idle: leaky without
its spinning kthread, allocstorm unloaded after tracing, so the guest idles), then
freezes and scans it --scans times with the default options (untracked="roots": all of untracked RAM
is a root) and once with untracked="ignore" (kmemleak's own roots only).

Per scan: paused_s (the guest stood still: stop, registers, RAM copy, resume),
copy_s (the RAM copy alone), duration_s (the scan, with the guest running again),
bytes scanned, objects in the table and leaks reported. Targets (from the issue):
>= 1 GB/s scanned with the shared-RAM backend; a 2 GiB guest paused <= 2 s per scan.
"""

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak.guest import Guest  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.kernel.modules import Symbolizer  # noqa: E402
from qemuleak.objects import ObjectTable  # noqa: E402
from qemuleak.scan import Options, scan  # noqa: E402
from tools.busy_guest import busy_guest  # noqa: E402
from tools.replay_scan import save  # noqa: E402
from qemuleak.snapshot import freeze  # noqa: E402
from qemuleak.session import unwinding  # noqa: E402
from qemuleak.tracer import Tracer, tracing  # noqa: E402

GB = 1e9
TARGET_SCAN_BPS = 1 * GB          # scanned bytes per second, shared-RAM backend
TARGET_PAUSE_S = 2.0              # per scan, for a 2 GiB guest
TARGET_PAUSE_MIB = 2048


@dataclass
class Run:
    mode: str               # Options.untracked
    paused_s: float
    copy_s: float
    duration_s: float
    bytes_scanned: int
    objects: int
    leaks: int
    steps: dict             # scan.Result.steps_s: kernel walks, reach, report
    threads: int            # scan.Result.threads: of the reach step

    @property
    def scan_bps(self) -> float:
        return self.bytes_scanned / self.duration_s


@dataclass
class SizeResult:
    memory_mib: int
    ram_bytes: int
    backend: str
    traced_s: float
    allocs: int
    frees: int
    freed: int
    runs: list[Run]
    ignore: Run
    load: tuple[float, float, float]


def one_scan(kernel, table, guest, symbolizer, tracer, options: Options) -> Run:
    snapshot = freeze(guest)
    result = scan(kernel, table, snapshot, options, symbolizer, tracer.freed)
    return Run(options.untracked, snapshot.paused_s, snapshot.copy_s, result.duration_s,
               result.bytes_scanned, result.objects, len(result.leaks), result.steps_s,
               result.threads)


def bench_size(image, arch: str, memory_mib: int, scans: int, trace_seconds: float,
               tmp: Path, save_to: Path | None = None, idle: bool = False) -> SizeResult:
    with busy_guest(image, arch, memory_mib, tmp, spinner=not idle) as vm:
        with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
            kernel = Kernel.open(guest, system_map=image.system_map)
            table = ObjectTable()
            symbolizer = Symbolizer(kernel)
            tracer = Tracer(kernel, table, **unwinding(kernel, symbolizer))
            start = time.monotonic()
            with tracing(tracer):
                tracer.run(lambda: time.monotonic() - start >= trace_seconds)
            traced_s = time.monotonic() - start
            guest.was_running = True
            # Tracing leaves the guest stopped; let it run (allocstorm busy) so each
            # freeze stops a running guest and each scan runs beside it, as in use.
            # (_resume_for_good also clears a stop a vCPU reports late.)
            guest._resume_for_good()
            if idle:                           # allocstorm stopped: the guest idles
                vm.send_line("rmmod allocstorm && echo storm-$((40 + 2))")
                vm.wait_for_line("storm-42", timeout=60)
                time.sleep(1)
            runs = [one_scan(kernel, table, guest, symbolizer, tracer, Options())
                    for _ in range(scans)]
            ignore = one_scan(kernel, table, guest, symbolizer, tracer,
                              Options(untracked="ignore"))
            if save_to is not None:            # for tools/replay_scan.py
                save(save_to / f"{arch}-{memory_mib}", guest, freeze(guest), table,
                     tracer.freed, image.system_map)
            return SizeResult(memory_mib, guest.ram_size(), guest.mem.name, traced_s,
                              tracer.stats.allocs, tracer.stats.frees, len(tracer.freed),
                              runs, ignore, os.getloadavg())


def report(r: SizeResult) -> None:
    ram = r.ram_bytes
    print(f"\n== {r.memory_mib} MiB guest ({ram / 2**20:.0f} MiB RAM, backend {r.backend}); "
          f"traced {r.allocs} allocs / {r.frees} frees in {r.traced_s:.1f} s, "
          f"{r.freed} freed remembered; host load avg {r.load[0]:.2f}")
    head = (f"  {'scan':<12} {'paused s':>9} {'copy s':>7} {'copy GB/s':>10} {'scan s':>7} "
            f"{'scanned MB':>11} {'scan GB/s':>10} {'objects':>8} {'leaks':>6}  "
            f"{'kernel s':>8} {'reach s':>7} {'report s':>8} {'threads':>7}")
    print(head)

    def row(label: str, x: Run) -> None:
        print(f"  {label:<12} {x.paused_s:9.3f} {x.copy_s:7.3f} {ram / x.copy_s / GB:10.2f} "
              f"{x.duration_s:7.3f} {x.bytes_scanned / 1e6:11.1f} {x.scan_bps / GB:10.2f} "
              f"{x.objects:8d} {x.leaks:6d}  {x.steps['kernel']:8.3f} {x.steps['reach']:7.3f} "
              f"{x.steps['report']:8.3f} {x.threads:7d}")
    for i, x in enumerate(r.runs, 1):
        row(f"roots #{i}", x)
    row("ignore", r.ignore)
    med = statistics.median
    paused = med(x.paused_s for x in r.runs)
    copy_bps = med(ram / x.copy_s for x in r.runs)
    scan_bps = med(x.scan_bps for x in r.runs)
    objects = med(x.objects for x in r.runs)
    print(f"  median over {len(r.runs)} roots scans:")
    scan_ok = "meets" if scan_bps >= TARGET_SCAN_BPS else "MISSES"
    print(f"    scan      {scan_bps / GB:6.2f} GB/s   target >= 1 GB/s scanned with the "
          f"shared-RAM backend: {scan_ok}"
          + ("" if r.backend == "shared-ram" else f" (backend here: {r.backend})"))
    reach_bps = med(x.bytes_scanned / x.steps["reach"] for x in r.runs)
    fixed = med(x.steps["kernel"] + x.steps["report"] for x in r.runs)
    print(f"    reach     {reach_bps / GB:6.2f} GB/s   the reachability step alone; the rest, "
          f"{fixed:.3f} s, walks the kernel's structures and writes the report")
    if r.memory_mib == TARGET_PAUSE_MIB:
        pause_ok = "meets" if paused <= TARGET_PAUSE_S else "MISSES"
        note = f"target: a 2 GiB guest paused <= 2 s per scan: {pause_ok}"
    else:
        # scaled to 2 GiB by the copy rate, for comparison only
        note = (f"target (2 GiB guest): paused <= 2 s per scan; this size's copy rate "
                f"would copy 2 GiB in {2 * 2**30 / copy_bps:.2f} s")
    print(f"    paused    {paused:6.3f} s      {note}")
    print(f"    copy      {copy_bps / GB:6.2f} GB/s   (RAM size / copy_s)")
    print(f"    objects   {objects:8.0f}")
    print(f"    ignore    {r.ignore.scan_bps / GB:6.2f} GB/s, {r.ignore.duration_s:.3f} s, "
          f"{r.ignore.bytes_scanned / 1e6:.1f} MB scanned, {r.ignore.leaks} leaks "
          f"(roots median: {med(x.leaks for x in r.runs):.0f} leaks)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--memory", type=int, nargs="+", default=[512, 2048],
                    help="guest RAM sizes in MiB, one guest each")
    ap.add_argument("--scans", type=int, default=3, help="untracked=roots scans per size")
    ap.add_argument("--trace-seconds", type=float, default=5.0)
    ap.add_argument("--idle", action="store_true",
                    help="no spinning kthread, allocstorm unloaded after tracing: "
                         "scan an idle guest")
    ap.add_argument("--save", type=Path, metavar="DIR",
                    help="also save a snapshot per size under DIR for tools/replay_scan.py")
    args = ap.parse_args()
    command = [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
               else sys.executable, sys.argv[0], "--arch", args.arch,
               "--memory", *map(str, args.memory), "--scans", str(args.scans),
               "--trace-seconds", f"{args.trace_seconds:g}", *(["--idle"] if args.idle else [])]
    print(f"reproduce: cd {shlex.quote(os.getcwd())} && {shlex.join(command)}")
    storm = ("allocstorm unloaded after tracing and no spinner (idle)" if args.idle
             else "allocstorm running")
    print(f"guest: {args.arch}, 2 vCPUs, TCG, leaky loaded, {storm}; host: "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f} at start", flush=True)
    image = find_image(args.arch)
    wall = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for memory in args.memory:
            t = time.monotonic()
            r = bench_size(image, args.arch, memory, args.scans, args.trace_seconds, Path(tmp),
                           args.save, args.idle)
            report(r)
            print(f"  ({time.monotonic() - t:.0f} s for this size, boot included)", flush=True)
    print(f"\ntotal {time.monotonic() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
