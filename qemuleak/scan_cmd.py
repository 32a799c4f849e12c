"""`qemuleak scan`: one leak scan of a running guest with no tracing at all. Every
slab object comes from the SLUB inventory read out of a frozen copy of guest
memory; when the guest runs with `slub_debug=U`, SLUB keeps an allocation track
per object (caller, pid, cpu, jiffies and a stack depot backtrace), which gives
each leak its story at no cost to the guest. The guest stands still only while
qemuleak attaches and copies its RAM."""

import sys

from . import report
from .formats import render
from .guest import Guest
from .kernel import slub
from .kernel.kernel import Kernel
from .kernel.modules import Symbolizer
from .objects import ObjectTable
from .provenance import TrackSync
from .scan import Options, scan
from .session import ReportOptions, scan_line, write_atomic
from .snapshot import freeze

HINT_TRACKS = ("qemuleak: no allocation tracks: boot the guest with slub_debug=U for "
               "each leak's backtrace, pid and age (or use `qemuleak attach`)")


def inventory_table(kernel, snapshot) -> tuple[ObjectTable, bool, slub.Inventory]:
    """Every allocated slab object of the frozen guest as a table, in allocation
    order, with SLUB's allocation tracks where the caches keep them; whether any
    did; and the inventory itself."""
    table = ObjectTable()
    sync = TrackSync(kernel, table, {}, {}, untracked_too=True)
    inv = sync(snapshot)
    return table, sync.tracks_seen, inv


def run_scan(target: str, options: ReportOptions, label: str = "scan", vmlinux=None,
             system_map=None, backend: str = "auto", out=sys.stdout, err=sys.stderr) -> int:
    """Attach, freeze, inventory, scan, report; the guest runs on. 1 if leaks."""
    with Guest.connect(target, backend=backend) as guest:
        kernel = Kernel.open(guest, vmlinux=vmlinux, system_map=system_map)
        if guest.was_running:
            guest.resume()              # stand still only for the copy
        snapshot = freeze(guest)
        table, tracked, inv = inventory_table(kernel, snapshot)
        if not tracked:
            print(HINT_TRACKS, file=err)
        result = scan(kernel, table, snapshot, Options(stack=options.stack, untracked="roots",
                                                   all_objects=options.all_objects),
                      Symbolizer(kernel), inventory=inv)
    leaks, suppressed = report.filter_leaks(result.leaks, suppressions=options.suppressions,
                                            module=options.module_filter, min_age=options.min_age)
    done = report.Scan(label, result.time, result.objects, result.bytes_scanned, leaks,
                       suppressed, result.paused_s, result.duration_s)
    print(f"qemuleak: {scan_line(done)}", file=err)
    text = render(options.format, [done], options.source_root)
    if options.output is None:
        out.write(text)
    else:
        write_atomic(options.output, text)
    return 1 if leaks else 0
