#!/usr/bin/env python3
"""What a trace-free look at a guest costs: the SLUB inventory, SLUB's allocation
tracks with their stack depot backtraces, and the scan, on guests of each size.

    .venv/bin/python tools/bench_inventory.py [--arch x86_64] [--memory 512 2048] [--runs 3]

For each --memory size, boots the test guest (2 vCPUs, TCG, shared-RAM memfd) with
slub_debug=U, loads leaky and lets allocstorm run without end (a busy kernel);
then, --runs times: freeze (the guest stands still only for the RAM copy), the
inventory of every slab object, the vmalloc areas and per-CPU areas, the table with tracks and backtraces (what
`qemuleak scan` builds), and the scan. Prints seconds per step and objects per
second for the inventory.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak.guest import Guest  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.kernel import percpu, slub, vmalloc  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.kernel.modules import Symbolizer  # noqa: E402
from qemuleak.scan import Options, scan  # noqa: E402
from qemuleak.scan_cmd import inventory_table  # noqa: E402
from tools.busy_guest import busy_guest  # noqa: E402
from qemuleak.snapshot import freeze, guest_frozen  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def bench_size(image, arch: str, memory_mib: int, runs: int, tmp: Path) -> None:
    with busy_guest(image, arch, memory_mib, tmp, append="slub_debug=U") as vm:
        with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
            guest.was_running = True
            kernel = Kernel.open(guest, system_map=image.system_map)
            symbolizer = Symbolizer(kernel)
            guest.resume()
            print(f"\n== {memory_mib} MiB guest, slub_debug=U, allocstorm running")
            print(f"  {'run':<4} {'paused s':>9} {'inventory s':>12} {'objects':>8} "
                  f"{'Mobj/s':>7} {'vmalloc+pcpu s':>15} {'tracks+stacks s':>16} "
                  f"{'scan s':>7} {'leaks':>6}")
            rows = []
            for i in range(runs):
                snap = freeze(guest)
                with guest_frozen(guest, snap):
                    inv, inv_s = timed(lambda: slub.inventory(kernel, snap.ram))
                    _, other_s = timed(lambda: (vmalloc.allocations(kernel),
                                                percpu.chunk_map(kernel)))
                (table, _, inv), table_s = timed(lambda: inventory_table(kernel, snap))
                result, scan_s = timed(lambda: scan(kernel, table, snap, Options(), symbolizer,
                                                    inventory=inv))
                n = len(inv.addresses)
                rows.append((inv_s, table_s, scan_s, other_s))
                print(f"  {i + 1:<4} {snap.paused_s:9.3f} {inv_s:12.3f} {n:8d} "
                      f"{n / inv_s / 1e6:7.2f} {other_s:15.3f} {table_s - inv_s:16.3f} "
                      f"{scan_s:7.3f} {len(result.leaks):6d}")
            med = statistics.median
            print(f"  median: inventory {med(r[0] for r in rows):.3f} s, vmalloc and per-CPU "
                  f"{med(r[3] for r in rows):.3f} s, tracks and stacks "
                  f"{med(r[1] - r[0] for r in rows):.3f} s, scan {med(r[2] for r in rows):.3f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--memory", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    image = find_image(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        for mib in args.memory:
            bench_size(image, args.arch, mib, args.runs, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
