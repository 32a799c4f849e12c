#!/usr/bin/env python3
"""Scan a saved frozen guest again, offline, as often as you like: for profiling
the scanner without booting anything.

    .venv/bin/python tools/bench_scan.py --memory 512 --save /tmp/snap512
    .venv/bin/python tools/replay_scan.py /tmp/snap512 [--scans 5] [--profile] [--threads N]

`bench_scan.py --save DIR` writes the RAM copy (ram.npy), the registers, the
object table and what the guest looked like (state.pkl) of its last scan. Here a
Guest with no gdbstub reads them: the same kernel helpers and scan run on it, and
each scan's time per step (kernel walks, reach, report) is printed; --profile
prints a cProfile of the second scan (the first pays for imports and caches).
"""

import argparse
import cProfile
import pickle
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import reach  # noqa: E402
from qemuleak.arch import get_arch  # noqa: E402
from qemuleak.guest import Guest  # noqa: E402
from qemuleak.kernel.kernel import Kernel  # noqa: E402
from qemuleak.kernel.modules import Symbolizer  # noqa: E402
from qemuleak.scan import Options, scan  # noqa: E402
from qemuleak.snapshot import RamCopy, Snapshot  # noqa: E402


def save(directory: Path, guest, snapshot: Snapshot, table, freed: dict, system_map) -> None:
    """What replay needs of a live guest and one of its snapshots."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "ram.npy", snapshot.ram.data)
    with open(directory / "state.pkl", "wb") as f:
        pickle.dump({"arch": guest.arch.name, "layout": guest.layout, "block": guest.ram_block,
                     "ranges": guest.ranges, "registers": snapshot.registers,
                     "threads": [f"t{i}" for i in range(len(snapshot.registers))],
                     "table": table, "freed": dict(freed), "time": snapshot.time,
                     "system_map": str(system_map) if system_map else None}, f)


class SavedGuest(Guest):
    """A guest that is only a saved snapshot: memory and registers, no gdbstub."""

    def __init__(self, state: dict, ram: np.ndarray):
        super().__init__(None, get_arch(state["arch"]), state["layout"], state["block"],
                         state["ranges"], False)
        self.mem = RamCopy(ram, state["ranges"])
        self._regs = dict(enumerate(state["registers"]))
        self.threads = state["threads"]

    def cpus(self) -> list[str]:
        return self.threads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory", type=Path)
    ap.add_argument("--scans", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the reach step (default: the CPUs idle at each scan)")
    args = ap.parse_args()
    reach.THREADS = args.threads
    with open(args.directory / "state.pkl", "rb") as f:
        state = pickle.load(f)
    ram = np.load(args.directory / "ram.npy")
    kernel = Kernel.open(SavedGuest(state, ram), system_map=state["system_map"])
    symbolizer = Symbolizer(kernel)
    profile = cProfile.Profile()
    for i in range(args.scans):
        snapshot = Snapshot(RamCopy(ram.copy(), state["ranges"]), state["registers"],
                            state["time"], 0.0, 0.0)
        if args.profile and i == 1:
            profile.enable()
        start = time.perf_counter()
        r = scan(kernel, state["table"], snapshot, Options(), symbolizer, state["freed"])
        took = time.perf_counter() - start
        profile.disable()
        steps = "  ".join(f"{k} {v:.3f} s" for k, v in r.steps_s.items())
        print(f"scan {i + 1}: {took:.3f} s, {r.bytes_scanned / 1e6:.1f} MB scanned, "
              f"{r.bytes_scanned / took / 1e9:.2f} GB/s, {r.objects} objects, "
              f"{len(r.leaks)} leaks ({steps})")
    if args.profile and args.scans > 1:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
