"""A leak-hunting session on one guest: trace from now on, scan when asked, keep
every scan's report. `qemuleak attach`, `qemuleak run` and `trace --scan` all
drive one.

Scans happen with the breakpoints in place: the snapshot is taken with the guest
stopped, and while the host analyses it the guest runs until its next allocation
or free, where it waits at the breakpoint. No allocation or free goes unseen, so
the table stays exact across scans.

Like kmemleak, a leak is reported once: later scans list only new leaks, and
`clear` turns what was reported so far into "not a leak" for good.
"""

import os
import sys
import time
from dataclasses import dataclass

from . import provenance, report
from .errors import QemuleakError
from .formats import render
from .kernel.modules import Symbolizer
from .objects import Flags, ObjectTable
from .scan import Options, Result, frames, scan
from .snapshot import freeze


@dataclass
class ReportOptions:
    """What is scanned and how it is reported."""

    format: str = "text"                 # see formats.FORMATS
    output: str | None = None            # rewritten (atomically) after every scan
    suppressions: report.Suppressions | None = None
    module_filter: str | None = None
    min_age: float = 0.0
    stack: bool = True
    untracked: str = "roots"
    all_objects: bool = False            # report objects from before tracing too
    provenance: str = "auto"             # see provenance.MODES
    source_root: str | None = None       # SARIF: source paths relative to this directory


class Session:
    """The tracer on a guest plus the scans made so far."""

    def __init__(self, kernel, options: ReportOptions | None = None, out=sys.stdout,
                 debug_files=()):
        """`debug_files`: .ko files with DWARF, for source lines in module frames."""
        self.kernel = kernel
        self.guest = kernel.guest
        self.options = options or ReportOptions()
        self.out = out
        self.table = ObjectTable()
        self.symbolizer = Symbolizer(kernel, debug_files=debug_files)
        self.provenance = provenance.choose(kernel, self.options.provenance)
        w = provenance.watch(kernel, self.provenance, self.table,
                             **unwinding(kernel, self.symbolizer))
        self.tracer, self.sync, self.untraced = w.tracer, w.sync, w.lost
        self.reporter = report.Reporter()
        self.scans: list[report.Scan] = []
        self.last: Result | None = None
        self.leaks_reported = 0

    def scan(self, label: str) -> report.Scan:
        """Freeze the guest, scan, and record the leaks not reported before; the
        output file (if any) is rewritten with every scan so far."""
        self.symbolizer.refresh()
        o = self.options
        snapshot = freeze(self.guest)
        inventory = self.sync(snapshot) if self.sync is not None else None
        result = scan(self.kernel, self.table, snapshot,
                      Options(o.stack, o.untracked, o.all_objects),
                      self.symbolizer, self.tracer.freed, inventory)
        self.last = result
        leaks, suppressed = report.filter_leaks(result.leaks, suppressions=o.suppressions,
                                                module=o.module_filter, min_age=o.min_age)
        fresh = self.reporter.new(leaks)
        done = report.Scan(label, result.time, result.objects, result.bytes_scanned, fresh,
                           suppressed, result.paused_s, result.duration_s)
        self.scans.append(done)
        self.leaks_reported += len(fresh)
        if o.output is not None:
            write_atomic(o.output, render(o.format, self.scans, o.source_root))
        return done

    def clear(self) -> int:
        """kmemleak's `clear`: what was reported so far is never a leak again (its
        references then count, as a gray object's do). How many were cleared."""
        keys = self.reporter.clear()
        for address, seq in keys:
            r = self.table.get(address)
            if r is not None and r.seq == seq:
                self.table.set_flags(address, int(r.flags | Flags.NOT_LEAK))
        return len(keys)

    def dump(self, address: int) -> str:
        """kmemleak's `dump=ADDR`: the record of the tracked object containing it,
        with its state in the latest scan and, if it was referenced, from where."""
        r = self.table.find(address)
        if r is None:
            return f"no tracked object contains {address:#x}\n"
        state = self.last.state_of(r.address) if self.last is not None else None
        kind, count = state if state is not None else ("not scanned yet", 0)
        leak = report.Leak(r.address, r.size, r.comm, r.pid, r.cpu, r.jiffies, 0.0,
                           kind.split()[0], frames(self.symbolizer, r.backtrace), b"", r.seq,
                           r.kind.name.lower(), r.cache)
        text = report.format_dump(leak, count=count, min_count=1, flags=f"{int(r.flags):#x}")
        if state is not None and kind == "referenced":
            # what kept it, in that scan's snapshot (its buffer lives until the next scan)
            text += "  referenced from:\n" + "".join(f"    {w}\n" for w in self.last.why(r.address))
        return text

    def report_text(self) -> str:
        """Every scan so far in the chosen format."""
        return render(self.options.format, self.scans, self.options.source_root)

    def status(self) -> str:
        """One line: objects tracked, rates, the last scan, leaks so far."""
        s = self.tracer.stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        last = "no scan yet"
        if self.scans:
            ago = time.time() - self.scans[-1].time
            last = f"last scan {ago:.0f} s ago"
        objects = f"{len(self.table)} objects tracked"
        if self.sync is not None:        # slab objects are counted at each scan
            objects += " (slab objects as of the last scan)"
        return (f"{objects}, {s.allocs / elapsed:.0f} allocs/s, "
                f"{s.frees / elapsed:.0f} frees/s, {last}, {self.leaks_reported} leaks")

    def describe(self) -> str:
        """The start-up line: where provenance comes from."""
        return provenance.describe(self.provenance, self.kernel,
                                   list(self.tracer.probes.values()), self.untraced)


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


def scan_line(s: report.Scan) -> str:
    """One line about a finished scan, for stderr and `ctl scan`."""
    return (f"scan {s.label}: {len(s.leaks)} new leaks ({sum(x.size for x in s.leaks)} bytes), "
            f"{s.suppressed} suppressed; {s.objects_tracked} objects, "
            f"{s.bytes_scanned / 1e6:.0f} MB scanned in {s.duration_s:.2f} s "
            f"(guest paused {s.paused_s:.2f} s)")


def write_atomic(path: str, text: str) -> None:
    """Replace `path` by a rename, so readers always see a whole report."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
