"""`qemuleak trace`: trace a running guest's allocations for a while and show what
is still allocated, grouped by call site, or (--scan) what leaked. The guest is
left running, with no breakpoint behind, however tracing ends (time up, Ctrl-C,
SIGTERM, an error)."""

import sys
import time
from collections import Counter

from .guest import Guest
from .kernel.kernel import Kernel
from .session import ReportOptions, Session, scan_line
from .tracer import tracing


def run_trace(target: str, duration: float, vmlinux=None, system_map=None,
              backend: str = "auto", top: int = 10, out=sys.stdout,
              scan: ReportOptions | None = None, dump: int | None = None) -> int:
    with Guest.connect(target, backend=backend) as guest:
        kernel = Kernel.open(guest, vmlinux=vmlinux, system_map=system_map)
        session = Session(kernel, scan or ReportOptions(), out)
        tracer = session.tracer
        deadline = time.monotonic() + duration if duration > 0 else float("inf")
        interrupted = False
        last = 0.0
        print(f"qemuleak: {guest.arch.name} ({kernel.banner.split()[2]}), "
              f"{session.describe()}; Ctrl-C to stop",
              file=sys.stderr, flush=True)

        def until() -> bool:
            nonlocal last
            now = time.monotonic()
            if now - last >= 2:
                last = now
                s = tracer.stats
                print(f"qemuleak: {len(session.table)} live objects, {s.allocs} allocs, "
                      f"{s.frees} frees, {s.stops} stops", file=sys.stderr, flush=True)
            return now >= deadline
        with tracing(tracer):
            try:
                tracer.run(until)
            except KeyboardInterrupt:
                interrupted = True
        interrupted = interrupted or tracer.interrupted
        guest.was_running = True          # resume on close: tracing ran it
        session.symbolizer.refresh()
        if scan is None and dump is None:
            _summary(session, top, out)
            return 130 if interrupted else 0
        print("qemuleak: freezing the guest and scanning", file=sys.stderr, flush=True)
        done = session.scan("trace")
        print(f"qemuleak: {scan_line(done)}", file=sys.stderr, flush=True)
        if session.options.output is None:
            out.write(session.report_text())
        if dump is not None:
            out.write(session.dump(dump))
        return 1 if done.leaks else 0


def _summary(session: Session, top: int, out) -> None:
    s = session.tracer.stats
    elapsed = time.monotonic() - s.started
    print(f"traced {s.allocs} allocations and {s.frees} frees in {elapsed:.1f} s "
          f"({s.allocs / max(elapsed, 1e-9):.0f} allocs/s); {len(session.table)} objects "
          f"still live", file=out)
    groups: Counter = Counter()
    sizes: Counter = Counter()
    for r in session.table:
        groups[r.backtrace] += 1
        sizes[r.backtrace] += r.size
    for bt, count in groups.most_common(top):
        print(f"\n{count} objects, {sizes[bt]} bytes:", file=out)
        for pc in bt[:8]:
            print(f"    [<{pc:016x}>] {session.symbolizer.format(pc)}", file=out)


def resume(target: str) -> int:
    """Let run a guest that a killed debugger left stopped: QEMU keeps a dead
    debugger's breakpoints, so drop them all first."""
    with Guest.connect(target) as guest:
        guest.rsp.drop_stub_breakpoints()
        guest.was_running = True
    return 0
