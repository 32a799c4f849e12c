"""`qemuleak trace`: trace a running guest's allocations for a while and show what
is still allocated, grouped by call site. The guest is left running, with no
breakpoint behind, however tracing ends (time up, Ctrl-C, SIGTERM, an error)."""

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

from .errors import QemuleakError
from .guest import Guest
from .kernel.kernel import Kernel
from .kernel.modules import Symbolizer
from .objects import ObjectTable
from .tracer import Tracer, tracing


@dataclass
class ScanRequest:
    """What `trace --scan` reports, and how."""

    format: str = "text"                 # text, json, summary
    output: str | None = None
    suppressions: object = None          # report.Suppressions
    module_filter: str | None = None
    min_age: float = 0.0
    stack: bool = True
    untracked: str = "roots"
    dump: int | None = None


def run_trace(target: str, duration: float, vmlinux=None, system_map=None,
              backend: str = "auto", top: int = 10, out=sys.stdout,
              scan: ScanRequest | None = None) -> int:
    with Guest.connect(target, backend=backend) as guest:
        kernel = Kernel.open(guest, vmlinux=vmlinux, system_map=system_map)
        table = ObjectTable()
        symbolizer = Symbolizer(kernel)
        tracer = Tracer(kernel, table, **unwinding(kernel, symbolizer))
        deadline = time.monotonic() + duration if duration > 0 else float("inf")
        interrupted = False
        last = 0.0
        print(f"qemuleak: tracing {len(tracer.probes)} allocator functions on "
              f"{guest.arch.name} ({kernel.banner.split()[2]}); Ctrl-C to stop",
              file=sys.stderr, flush=True)

        def until() -> bool:
            nonlocal last
            now = time.monotonic()
            if now - last >= 2:
                last = now
                s = tracer.stats
                print(f"qemuleak: {len(table)} live objects, {s.allocs} allocs, "
                      f"{s.frees} frees, {s.stops} stops", file=sys.stderr, flush=True)
            return now >= deadline
        with tracing(tracer):
            try:
                tracer.run(until)
            except KeyboardInterrupt:
                interrupted = True
        interrupted = interrupted or tracer.interrupted
        guest.was_running = True          # resume on close: tracing ran it
        symbolizer.refresh()
        if scan is None:
            _summary(table, tracer, symbolizer, top, out)
            return 130 if interrupted else 0
        return scan_and_report(kernel, table, tracer, symbolizer, scan, out)


def scan_and_report(kernel, table, tracer, symbolizer, request: ScanRequest, out) -> int:
    """Freeze, scan, and write the report; 1 if leaks were reported, else 0."""
    from . import report
    from .scan import Options, scan
    from .snapshot import freeze
    print("qemuleak: freezing the guest and scanning", file=sys.stderr, flush=True)
    result = scan(kernel, table, freeze(kernel.guest),
                  Options(stack=request.stack, untracked=request.untracked),
                  symbolizer, tracer.freed)
    leaks, suppressed = report.filter_leaks(result.leaks, suppressions=request.suppressions,
                                            module=request.module_filter,
                                            min_age=request.min_age)
    print(f"qemuleak: scanned {result.bytes_scanned / 1e6:.0f} MB, {result.objects} objects "
          f"in {result.duration_s:.2f} s (guest paused {result.paused_s:.2f} s): "
          f"{len(leaks)} leaks, {suppressed} suppressed", file=sys.stderr, flush=True)
    if request.format == "json":
        text = report.json_text([report.Scan("trace", result.time, result.objects,
                                             result.bytes_scanned, leaks, suppressed,
                                             result.paused_s, result.duration_s)])
    elif request.format == "summary":
        text = report.format_summary(leaks, suppressed)
    else:
        text = report.format_text(leaks)
    if request.dump is not None:
        text += _dump(table, result, symbolizer, request.dump)
    _write(text, request.output, out)
    return 1 if leaks else 0


def _dump(table, result, symbolizer, address: int) -> str:
    from . import report
    from .scan import frames
    r = table.find(address)
    state = result.state_of(r.address) if r is not None else None
    if r is None or state is None:
        return f"qemuleak: no tracked object contains {address:#x}\n"
    leak = report.Leak(r.address, r.size, r.comm, r.pid, r.cpu, r.jiffies, 0.0,
                       state[0].split()[0], frames(symbolizer, r.backtrace), b"", r.seq,
                       r.kind.name.lower(), r.cache)
    return report.format_dump(leak, count=state[1], min_count=1, flags=f"{int(r.flags):#x}")


def _write(text: str, path: str | None, out) -> None:
    """To `path` atomically (a rename), else to `out`."""
    if path is None:
        out.write(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def unwinding(kernel, symbolizer: Symbolizer | None = None) -> dict:
    """Tracer arguments that give allocations full backtraces: the unwinder, and a
    hook that teaches it (and `symbolizer`) each module as it loads. Empty when the
    kernel has no unwind tables we read (the backtrace is then the allocator's
    entry only)."""
    try:
        from .unwind import unwinder_for
        unwinder = unwinder_for(kernel)
    except QemuleakError:
        return {}
    sp = kernel.guest.arch.sp_reg

    def module_loaded() -> None:
        unwinder.refresh_modules(kernel)
        if symbolizer is not None:
            symbolizer.refresh()
    return {"unwinder": lambda regs, stack: unwinder.unwind(regs, regs[sp], stack, at_entry=True),
            "on_module_load": module_loaded}


def _summary(table: ObjectTable, tracer: Tracer, symbols: Symbolizer, top: int, out) -> None:
    s = tracer.stats
    elapsed = time.monotonic() - s.started
    print(f"traced {s.allocs} allocations and {s.frees} frees in {elapsed:.1f} s "
          f"({s.allocs / max(elapsed, 1e-9):.0f} allocs/s); {len(table)} objects still live",
          file=out)
    groups: Counter = Counter()
    sizes: Counter = Counter()
    for r in table:
        groups[r.backtrace] += 1
        sizes[r.backtrace] += r.size
    for bt, count in groups.most_common(top):
        print(f"\n{count} objects, {sizes[bt]} bytes:", file=out)
        for pc in bt[:8]:
            print(f"    [<{pc:016x}>] {symbols.format(pc)}", file=out)


def resume(target: str) -> int:
    """Let run a guest that a killed debugger left stopped: QEMU keeps a dead
    debugger's breakpoints, so drop them all first."""
    with Guest.connect(target) as guest:
        guest.rsp.drop_stub_breakpoints()
        guest.was_running = True
    return 0
