#!/usr/bin/env python3
"""Scan rate of qemuleak.reach.reachability on a synthetic guest, no QEMU needed.

    .venv/bin/python tools/bench_reach.py [--ram-mib 512] [--runs 5] [--seed 1]
                                          [--objects-per-mib 600] [--untag arm64]
                                          [--reach path/to/reach.py]

Builds a RAM copy shaped like a busy guest's, with the roots of scan.py's default
mode (all allocated RAM but the slab pages):
- pages are free (~28%, zero), slab (~12%: order-0..3 slabs of one size class
  each, ~85% of their slots allocated, requested sizes up to the slot size), or
  other allocated pages (~60%: the root segments);
- objects: the slab objects, some kmalloc-large ones (page allocator, inside the
  root segments), vmalloc areas (each page mapped to an allocated page) and
  per-CPU objects (small addresses, one copy per CPU), ~300k for 512 MiB;
- words (ROOT_P, OBJ_P): in root pages 45% zero, 25% small integers, 12% random
  bits, 4% text and 3% vmemmap pointers, 10% direct-map pointers elsewhere (most
  to other allocated pages), 1% into objects (interior ones included); in objects
  more pointers: 25% into objects, 5% direct-map elsewhere, 5% list_head-style
  self pointers. Roots point into a subset of the objects only, so the rest turns
  gray in waves; a few objects are never pointed to (leaks);
- min_count 0 for a few objects, scan_ok False for a few, vCPU registers.

Then runs reachability --runs times and prints each run's time and GB/s
(bytes_scanned / seconds) and the median (the host has 2 CPUs and QEMU guests may
be running beside: take the median). The digest line (gray, counts, waves,
bytes) must not change between implementations; --reach loads another reach.py
(e.g. an older version) in place of qemuleak.reach, to compare on the same data.
"""

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak.reach import Segments  # noqa: E402

PAGE = 4096
DIRECT = 0xFFFF888000000000
VMALLOC = 0xFFFFC90000000000
VMEMMAP = 0xFFFFEA0000000000
TEXT = 0xFFFFFFFF81000000
PERCPU = 0x3C000
CPUS = 2
GB = 1e9

# slab size classes (kmalloc and some named caches) and how often slabs have them
CLASSES = np.array([8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096,
                    56, 72, 104, 136, 200, 232, 576, 704, 1152, 3264])
WEIGHTS = np.array([1, 2, 4, 6, 5, 6, 7, 7, 6, 5, 3, 2, 4, 4, 3, 4, 4, 3, 3, 2, 2, 1], float)

# word kinds in root pages and in slab pages (see _fill)
#          zero  small  bits  text  vmemmap  dm-else  obj   self
ROOT_P = [0.45, 0.25, 0.12, 0.04, 0.03, 0.10, 0.01, 0.00]
OBJ_P = [0.30, 0.20, 0.05, 0.05, 0.05, 0.05, 0.25, 0.05]


class Guest:
    """The synthetic inputs of one reachability call."""

    def __init__(self, ram_mib: int, objects_per_mib: int, seed: int):
        rng = np.random.default_rng(seed)
        self.ram = np.zeros(ram_mib << 20, np.uint8)
        pages = len(self.ram) // PAGE
        # page roles in runs: 0 free, 1 other allocated (roots), 2 slab
        role = np.zeros(pages, np.int8)
        at = 0
        while at < pages:
            n = int(min(rng.geometric(1 / 48), pages - at))
            role[at:at + n] = rng.choice(3, p=[0.28, 0.60, 0.12])
            at += n
        role[:256] = 1                               # kernel image, data, bss: roots
        self.role = role
        target_objects = objects_per_mib * ram_mib
        starts, sizes = self._slabs(rng, role, target_objects)
        big_s, big_n = self._kmalloc_large(rng, role, max(ram_mib // 2, 8))
        vm_s, vm_n, vm_seg = self._vmalloc(rng, role, max(ram_mib // 8, 8))
        pc_s, pc_n, pc_seg = self._percpu(rng, role, max(ram_mib * 2, 64))
        # objects in address order: per-CPU < direct map < vmalloc
        addr = np.concatenate([pc_s, starts, big_s, vm_s]).astype(np.uint64)
        size = np.concatenate([pc_n, sizes, big_n, vm_n]).astype(np.int64)
        order = np.argsort(addr, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.starts, self.sizes = addr[order], size[order]
        self.ends = self.starts + self.sizes.astype(np.uint64)
        n = len(self.starts)
        direct = (self.starts >= np.uint64(DIRECT)) & (self.starts < np.uint64(VMALLOC))
        d_idx = np.flatnonzero(direct)
        seg_direct = Segments(d_idx, (self.starts[d_idx] - np.uint64(DIRECT)).astype(np.int64),
                              self.sizes[d_idx])
        n_pc, n_dm = len(pc_s), len(starts) + len(big_s)
        vm_seg.owner = rank[vm_seg.owner + n_pc + n_dm]
        pc_seg.owner = rank[pc_seg.owner]
        self.contents = Segments.concat([pc_seg, seg_direct, vm_seg])
        # roots: runs of "other" allocated pages
        edges = np.flatnonzero(np.diff(np.concatenate(([0], (role == 1).astype(np.int8), [0]))))
        lo, hi = edges[::2], edges[1::2]
        self.roots = Segments.of(np.full(len(lo), -1), lo * PAGE, (hi - lo) * PAGE)
        # who is pointed to: roots point into `rooted`, objects into anything but leaks
        leak = rng.random(n) < 0.005
        rooted = np.flatnonzero(~leak & (rng.random(n) < 0.4))
        linked = np.flatnonzero(~leak)
        self._fill(rng, rooted, linked)
        self.min_count = np.where(rng.random(n) < 0.005, 0, 1).astype(np.int64)
        self.scan_ok = rng.random(n) >= 0.005
        regs = rng.integers(0, 1 << 63, CPUS * 40, dtype=np.uint64)
        pick = rng.choice(n, 10)
        regs[:10] = self.starts[pick] + (self.sizes[pick] // 2).astype(np.uint64)
        self.registers = regs

    def _slabs(self, rng, role, target):
        """Slab objects in the slab pages: (addresses, sizes)."""
        slab_pages = np.flatnonzero(role == 2)
        w = WEIGHTS / WEIGHTS.sum()
        addr, size = [], []
        # runs of slab pages split into slabs of 1, 2, 4 or 8 pages
        runs = np.split(slab_pages, np.flatnonzero(np.diff(slab_pages) != 1) + 1)
        for run in runs:
            at, end = int(run[0]), int(run[-1]) + 1
            while at < end:
                cls = int(rng.choice(CLASSES, p=w))
                order = int(rng.integers(0, 4)) if cls >= 128 else 0
                order = min(order, (end - at).bit_length() - 1)
                nbytes = PAGE << order
                slots = nbytes // cls
                used = np.flatnonzero(rng.random(slots) < 0.85)
                base = DIRECT + at * PAGE
                addr.append(np.uint64(base) + (used * cls).astype(np.uint64))
                lo = max(cls // 2, 1) if cls > 8 else 1
                size.append(rng.integers(lo, cls + 1, len(used)))
                at += 1 << order
        addr, size = np.concatenate(addr).astype(np.uint64), np.concatenate(size)
        # thin out to about the target count (keeps the slab layout)
        if len(addr) > target:
            keep = np.sort(rng.choice(len(addr), target, replace=False))
            addr, size = addr[keep], size[keep]
        return addr, size

    def _kmalloc_large(self, rng, role, count):
        """Page-allocator objects inside root pages (their bytes are no roots)."""
        other = np.flatnonzero(role == 1)
        pages = np.unique(rng.choice(other[256:], count, replace=False))
        sizes = rng.integers(PAGE + 1, 2 * PAGE + 1, len(pages))
        ok = np.ones(len(pages), bool)
        ok[:-1] = pages[1:] - pages[:-1] >= 2          # no overlap
        ok &= (pages + 1 < len(role)) & np.isin(pages + 1, other)
        pages, sizes = pages[ok], sizes[ok]
        return np.uint64(DIRECT) + (pages * PAGE).astype(np.uint64), sizes

    def _vmalloc(self, rng, role, count):
        """vmalloc areas, each page backed by some root page: (starts, sizes, contents)."""
        other = np.flatnonzero(role == 1)[256:]
        npages = rng.integers(1, 65, count)
        gaps = np.concatenate(([0], (npages[:-1] + 1) * PAGE))     # a guard page between
        starts = np.uint64(VMALLOC) + np.cumsum(gaps).astype(np.uint64)
        sizes = npages * PAGE - rng.integers(0, PAGE, count)
        owner = np.repeat(np.arange(count), npages)
        backing = rng.choice(other, len(owner), replace=False)
        first = np.concatenate(([0], np.cumsum(npages)[:-1]))
        page_in = np.arange(len(owner)) - np.repeat(first, npages)
        length = np.minimum(sizes[owner] - page_in * PAGE, PAGE)
        return (starts.astype(np.uint64), sizes,
                Segments.of(owner, backing * PAGE, length))

    def _percpu(self, rng, role, count):
        """Per-CPU objects: small addresses; each CPU's copy in its own root pages."""
        sizes = rng.integers(4, 65, count)
        starts = PERCPU + np.cumsum(np.concatenate(([0], (sizes[:-1] + 15) // 16 * 16)))
        span = int(starts[-1] + sizes[-1] - PERCPU)
        other = np.flatnonzero(role == 1)[256:]
        segs = []
        for cpu in range(CPUS):
            # contiguous root pages for each CPU's chunk
            need = span // PAGE + 1
            runs = np.flatnonzero(np.convolve(np.isin(np.arange(len(role)), other).astype(int),
                                              np.ones(need, int), "valid") == need)
            base = int(runs[len(runs) * (cpu + 1) // (CPUS + 1)]) * PAGE
            segs.append(Segments.of(np.arange(count), base + starts - PERCPU, sizes))
        return starts.astype(np.uint64), sizes, Segments.concat(segs)

    def _fill(self, rng, rooted, linked):
        """Write the words of root and slab pages (free pages stay zero)."""
        ram64 = self.ram.view(np.uint64)
        # word kind per region: a lookup table indexed by region * 1000 + a random draw
        lut = np.concatenate([np.searchsorted(np.cumsum(p), (np.arange(1000) + 0.5) / 1000)
                              for p in (ROOT_P, OBJ_P)]).astype(np.int8)
        span = np.uint64((1 << (len(self.ram) - 1).bit_length()) - 8)
        # per kind: value = base + (random & mask); kinds 6 and 7 are patched below
        base = np.array([0, 0, 0, TEXT, VMEMMAP, DIRECT, 0, DIRECT], np.uint64)
        mask = np.array([0, 0xFFFF, 2**64 - 1, 0xFFFFFF, 0xFFFFFC0, span, 0, 0], np.uint64)
        region = np.where(self.role == 2, 1000, 0).astype(np.int16)
        other = np.flatnonzero(self.role == 1)
        step = 1 << 22
        for lo in range(0, len(ram64), step):
            hi = min(lo + step, len(ram64))
            page = np.arange(lo, hi, dtype=np.int64) >> 9
            live = self.role[page] != 0
            kind = lut[region[page] + rng.integers(0, 1000, hi - lo, dtype=np.int16)]
            out = base[kind] + (rng.integers(0, 2**64 - 1, hi - lo, dtype=np.uint64, endpoint=True)
                                & mask[kind])
            me = np.flatnonzero(kind == 7)                    # list_head-style self pointers
            out[me] += ((lo + me) * 8).astype(np.uint64)
            # pointers into objects (interior ones too): roots into `rooted`, objects anywhere
            to_obj = np.flatnonzero(kind == 6)
            in_root = region[page[to_obj]] == 0
            t = np.where(in_root, rooted[rng.integers(0, len(rooted), len(to_obj))],
                         linked[rng.integers(0, len(linked), len(to_obj))])
            inner = (rng.random(len(to_obj)) * np.maximum(self.sizes[t], 1)).astype(np.uint64)
            inner[rng.random(len(to_obj)) < 0.6] = 0          # most point to the start
            out[to_obj] = self.starts[t] + inner
            # "elsewhere" direct-map pointers: mostly into other allocated pages
            # (page tables, page cache, ...), some into slab pages (free slots...)
            dm = np.flatnonzero(kind == 5)
            where = ((out[dm] - np.uint64(DIRECT)) >> np.uint64(12)).astype(np.int64)
            last = len(self.role) - 1
            stray = (where > last) | (self.role[np.minimum(where, last)] == 2)
            stray = dm[stray & (rng.random(len(dm)) < 0.8)]
            target = other[rng.integers(0, len(other), len(stray))].astype(np.uint64)
            out[stray] = (np.uint64(DIRECT) + (target << np.uint64(12))
                          + (out[stray] & np.uint64(0xFF8)))
            out[~live] = 0
            ram64[lo:hi] = out


def digest(result) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(result.gray).tobytes())
    h.update(np.ascontiguousarray(result.counts, np.int64).tobytes())
    h.update(f"{result.waves} {result.bytes_scanned}".encode())
    return h.hexdigest()[:16]


def load_reach(path: str | None):
    if path is None:
        from qemuleak import reach
        return reach
    spec = importlib.util.spec_from_file_location("reach_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm64_untag(words):
    """qemuleak.arch.arm64's untag_words, without importing the arch package."""
    top = np.uint64(0xFF << 56)
    return np.where(words >> np.uint64(55) & np.uint64(1), words | top, words & ~top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ram-mib", type=int, default=512)
    ap.add_argument("--objects-per-mib", type=int, default=600)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--untag", choices=["none", "arm64"], default="none")
    ap.add_argument("--reach", help="a reach.py to load instead of qemuleak.reach")
    args = ap.parse_args()
    reach = load_reach(args.reach)
    t = time.perf_counter()
    g = Guest(args.ram_mib, args.objects_per_mib, args.seed)
    built = time.perf_counter() - t
    print(f"guest: {args.ram_mib} MiB RAM, {len(g.starts)} objects "
          f"({len(g.contents)} content segments, {g.contents.bytes / 2**20:.1f} MiB), "
          f"roots {len(g.roots)} segments {g.roots.bytes / 2**20:.1f} MiB "
          f"({g.roots.bytes / len(g.ram):.0%} of RAM), built in {built:.1f} s")
    print(f"module: {reach.__file__}; untag: {args.untag}; host: {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.2f}")
    untag = arm64_untag if args.untag == "arm64" else None
    times, cpu_times, digests = [], [], set()
    for i in range(args.runs):
        t, c = time.perf_counter(), time.process_time()
        r = reach.reachability(g.ram, g.starts, g.ends, g.min_count, g.contents, g.roots,
                               g.registers, untag, g.scan_ok)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        times.append(dt)
        cpu_times.append(dc)
        digests.add(digest(r))
        print(f"  run {i + 1}: {dt:.3f} s ({dc:.3f} s CPU), {r.bytes_scanned / 1e6:.1f} MB "
              f"scanned, {r.bytes_scanned / dt / GB:.2f} GB/s", flush=True)
    gray = int(r.gray.sum())
    print(f"result: {gray} gray, {len(g.starts) - gray} white, {r.waves} waves, "
          f"{int(r.counts.sum())} references; digest {' '.join(sorted(digests))}")
    med, med_cpu = statistics.median(times), statistics.median(cpu_times)
    print(f"median: {med:.3f} s per call, {r.bytes_scanned / med / GB:.2f} GB/s "
          f"(by CPU time: {med_cpu:.3f} s, {r.bytes_scanned / med_cpu / GB:.2f} GB/s); "
          f"load avg {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
