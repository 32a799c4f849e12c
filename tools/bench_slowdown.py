#!/usr/bin/env python3
"""What watching a guest costs it, side by side in one run: the same workloads on
fresh guests of one image (TCG, 2 vCPUs, 512 MiB), timed on the host's clock from
the command sent to its end marker on the console (the guest's own clock stands
still while the gdbstub holds it stopped, so it would hide every stop).

    .venv/bin/python tools/bench_slowdown.py [--arch arm64] [--rounds 5] [--storm 200000]

Workloads: "shell" (ROUNDS x `ls -R /sys/kernel` with debugfs mounted, then
`cat /proc/slabinfo /proc/meminfo`) and "allocstorm" (STORM iterations of a
kmalloc/kfree pair, a kmem_cache pair every 16 and a vmalloc/vfree pair every 256,
from a kthread). Cases:
- plain: no slub_debug, untraced;
- tracks, untraced: booted with slub_debug=U,kmalloc-* (what `qemuleak run` boots),
  qemuleak attached but not tracing;
- tracks, qemuleak: the same guest under qemuleak's default (tracks) mode, with a
  scan every --scan-every seconds, each run right after an untraced one (single
  runs on this host move by ±30%, and guests differ as much: pairs on one guest
  and medians keep that out of the ratio);
- breakpoints: a plain guest under breakpoint tracing, on smaller workloads
  (one listing of /sys/kernel/slab, --bp-storm), compared with its stop floor: the
  stops it took over the bare stop rate, measured on the same guest running the
  same workload with the tracer's entry breakpoints and nothing done at a stop but
  `g`, `P`, `c` (a stop costs the guest a flush of all its translated code, so the
  rate depends on the workload).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import initramfs, provenance  # noqa: E402
from qemuleak.guest import Guest  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402
from qemuleak.session import ReportOptions, Session  # noqa: E402
from qemuleak.tracer import tracing  # noqa: E402
from tools.bench_access import bare_stop_cycles  # noqa: E402

SHELL = b"""mount -t debugfs none /sys/kernel/debug 2>/dev/null
i=0
while [ $i -lt $1 ]; do
    ls -R /sys/kernel > /dev/null 2>&1
    cat /proc/slabinfo /proc/meminfo > /dev/null
    i=$((i + 1))
done
echo bench-shell-$((1+1))-done
"""


SHELL_SMALL = b"""ls -R /sys/kernel/slab > /dev/null 2>&1
cat /proc/slabinfo /proc/meminfo > /dev/null
echo bench-shell-$((1+1))-done
"""


def workloads(rounds: int, storm: int, small: bool = False) -> list[tuple[str, str, str]]:
    """(name, command, end marker); `small`: the shell workload is one listing of
    /sys/kernel/slab (breakpoint tracing would take hours over the big one)."""
    shell = "sh /shell-small.sh" if small else f"sh /shell.sh {rounds}"
    return [("shell-small" if small else "shell", shell, "bench-shell-2-done"),
            ("allocstorm", f"insmod /modules/allocstorm.ko count={storm}",
             "allocstorm: done")]


def boot(image, tmp: Path, append: str) -> VM:
    initrd = initramfs.compose(image.base_initramfs, tmp / f"initrd{time.monotonic_ns()}.gz",
                               {**initramfs.module_files([image.module("allocstorm")]),
                                "shell.sh": SHELL, "shell-small.sh": SHELL_SMALL})
    vm = VM(VMConfig(kernel=image.kernel, arch=image.arch, initrd=initrd, smp=2,
                     append=append))
    vm.start()
    vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
    return vm


def untraced(vm: VM, command: str, marker: str) -> float:
    mark = len(vm.console_text())
    start = time.monotonic()
    vm.send_line(command)
    while marker not in vm.console_text()[mark:]:
        time.sleep(0.02)
    return time.monotonic() - start


def traced(vm: VM, session: Session, command: str, marker: str, scan_every: float) -> float:
    """Seconds for the command under the session's tracer, scanning every
    `scan_every` s (0: never)."""
    mark = len(vm.console_text())
    start = time.monotonic()
    next_scan = start + scan_every if scan_every else float("inf")
    with tracing(session.tracer) as tracer:
        vm.send_line(command)
        while True:
            tracer.run(lambda: marker in vm.console_text()[mark:] or time.monotonic() >= next_scan)
            if marker in vm.console_text()[mark:]:
                break
            session.scan(f"periodic-{len(session.scans)}")
            next_scan = time.monotonic() + scan_every
    return time.monotonic() - start


def bare_entries(tracer) -> dict[int, int]:
    """The tracer's entry breakpoints: address -> where the guest goes on from it
    (past ftrace's NOP)."""
    return {a: a + tracer._nop_length[a] for a in tracer.probes if tracer._nop_length[a]}


def after(vm: VM) -> None:
    """Unload allocstorm between runs."""
    vm.send_line("rmmod allocstorm; echo unloaded-$((1+1))")
    vm.wait_for_line("unloaded-2", timeout=120)


def run_case(image, tmp, append, runs, mode=None, scan_every=0.0,
             repeat: int = 1) -> tuple[dict, object]:
    """Seconds per workload on one fresh guest, the median of `repeat` runs (stops
    and allocations per run); the session (None untraced)."""
    vm = boot(image, tmp, append)
    out, session = {}, None
    try:
        if mode is None:
            for name, command, marker in runs:
                times = []
                for _ in range(repeat):
                    times.append(untraced(vm, command, marker))
                    if name == "allocstorm":
                        after(vm)
                out[name] = statistics.median(times)
            return out, None
        with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
            kernel = Kernel.open(guest, system_map=image.system_map)
            session = Session(kernel, ReportOptions(provenance=mode))
            for name, command, marker in runs:
                stops, allocs = session.tracer.stats.stops, session.tracer.stats.allocs
                times, paired = [], []
                for i in range(repeat):
                    if mode == "tracks":
                        # the same guest untraced (attached, no breakpoint in), run by
                        # run beside the traced one: guests differ by ±30% here
                        guest.resume()
                        paired.append(untraced(vm, command, marker))
                        if name == "allocstorm":
                            after(vm)
                        guest.pause()
                    elif i and name == "allocstorm":
                        guest.resume()
                        after(vm)
                        guest.pause()
                    times.append(traced(vm, session, command, marker, scan_every))
                    if mode == "tracks" and name == "allocstorm" and i < repeat - 1:
                        guest.resume()
                        after(vm)
                        guest.pause()
                out[name] = statistics.median(times)
                if paired:
                    out[name + " untraced"] = statistics.median(paired)
                out[name + " stops"] = (session.tracer.stats.stops - stops) / repeat
                out[name + " allocs"] = (session.tracer.stats.allocs - allocs) / repeat
                if mode == "tracks":
                    done = session.scan(f"after-{name}")
                    out[name + " scan paused"] = done.paused_s
                    out[name + " scan s"] = done.duration_s
                if name == "allocstorm":
                    guest.was_running = True
                    guest.resume()
                    after(vm)
                    guest.pause()
            if mode == "breakpoints":
                # The bare stop cycle, per workload, with the tracer's own entry
                # breakpoints: QEMU 7.2 flushes all translated code at every breakpoint
                # stop, so what a stop costs depends on how much code runs between two.
                entries = bare_entries(session.tracer)
                guest.resume()
                vm.send_line("while :; do sh /shell-small.sh > /dev/null; done &")
                time.sleep(2)
                guest.pause()
                out["shell stop cycles/s"] = bare_stop_cycles(guest, entries, 10.0)
                guest.resume()
                vm.send_line("kill $!; echo killed-$((1+1))")
                vm.wait_for_line("killed-2", timeout=120)
                vm.send_line("insmod /modules/allocstorm.ko count=1000000000")
                vm.wait_for_line("allocstorm: started", timeout=60)
                guest.pause()
                out["stop cycles/s"] = bare_stop_cycles(guest, entries, 10.0)
            guest.was_running = True
        return out, session
    finally:
        vm.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="x86_64", choices=("x86_64", "arm64"))
    ap.add_argument("--rounds", type=int, default=5, help="shell workload rounds")
    ap.add_argument("--storm", type=int, default=200_000, help="allocstorm iterations")
    ap.add_argument("--bp-storm", type=int, default=2_000, help="allocstorm under breakpoints")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each workload per guest, the median taken (breakpoint "
                         "cases: one)")
    ap.add_argument("--scan-every", type=float, default=0.0, metavar="SECONDS",
                    help="scans in tracks mode while a workload runs (default 0: one scan "
                         "after each, timed on its own)")
    args = ap.parse_args()
    image = find_image(args.arch)
    tracks = provenance.RUN_SLUB_DEBUG
    runs = workloads(args.rounds, args.storm)
    print(f"{args.arch} TCG guest, 2 vCPUs, 512 MiB, {image.release}; shell: {args.rounds} "
          f"rounds, allocstorm: {args.storm} iterations; host wall clock, median of "
          f"{args.repeat} runs per guest", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, _ = run_case(image, tmp, "", runs, repeat=args.repeat)
        print(f"  plain, untraced:            {fmt(plain)}", flush=True)
        watched, s = run_case(image, tmp, tracks, runs, "tracks", args.scan_every, args.repeat)
        quiet = {name: watched[name + " untraced"] for name, _, _ in runs}
        print(f"  {tracks}, untraced: {fmt(quiet)}", flush=True)
        print(f"  {tracks}, qemuleak:  {fmt(watched)}, {len(s.scans)} scans, "
              f"{s.tracer.stats.stops} stops", flush=True)
        for name, _, _ in runs:
            print(f"    scan after {name}: guest paused {watched[name + ' scan paused']:.2f} s, "
                  f"scan {watched[name + ' scan s']:.2f} s beside the running guest", flush=True)
        bp_runs = workloads(0, args.bp_storm, small=True)
        bp, _ = run_case(image, tmp, "", bp_runs, "breakpoints")
        print(f"  plain, breakpoints (allocstorm {args.bp_storm}): {fmt(bp)}", flush=True)
        bp_plain, _ = run_case(image, tmp, "", bp_runs)
        print(f"  plain, untraced, same small workloads: {fmt(bp_plain)}", flush=True)
    print("ratios (time / plain untraced time):")
    for (name, _, _), (small, _, _) in zip(runs, bp_runs):
        print(f"  {name:10}  tracks setting alone {quiet[name] / plain[name]:5.2f}x   "
              f"qemuleak tracks mode {watched[name] / plain[name]:5.2f}x "
              f"(qemuleak's share over the same setting: {watched[name] / quiet[name]:5.2f}x)   "
              f"breakpoints ({small}) {bp[small] / bp_plain[small]:7.1f}x")
    for name, _, _ in bp_runs:
        cycle = bp["shell stop cycles/s" if name.startswith("shell") else "stop cycles/s"]
        stops, allocs = bp[name + " stops"], max(bp[name + " allocs"], 1)
        floor = stops / cycle
        print(f"  {name:10}  breakpoints: {allocs} allocations, {stops / allocs:.2f} stops each, "
              f"{allocs / bp[name]:.0f} allocs/s; stop floor {floor:.1f} s at {cycle:.0f} "
              f"stop cycles/s: {bp[name] / floor:.2f}x the floor")
    return 0


def fmt(times: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" + (f" ({times[k + ' stops']:.0f} stops)"
                                         if k + " stops" in times else "")
                     for k, v in times.items()
                     if not k.endswith(("stops", "allocs", "cycles/s", "paused", "scan s",
                                        "untraced")))


if __name__ == "__main__":
    sys.exit(main())
