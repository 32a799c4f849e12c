"""Scan a frozen guest for leaks: kmemleak's reachability over the tracer's objects.

What is scanned, all read from one snapshot (see snapshot.py):
- objects: every object in the table; a per-CPU object's contents are its copy on
  each possible CPU, and references to it are its per-CPU cookie;
- roots: the vCPU registers, and either
  - untracked="roots" (default): what the page allocator holds that no
    inventory explains. Memory allocated before tracing began is not in the
    table, and its references must not be lost, so attaching to a VM that has run
    for hours gives no false reports. From the inventories come objects too,
    scanned when reached and reported only with `all_objects`: every slab object
    (kernel/slub.py), every vmalloc area but task stacks, module memory and
    per-CPU chunks (kernel/vmalloc.py), and every dynamic per-CPU area
    (kernel/percpu.py; scanned always and never reported, as kmemleak does with
    per-CPU areas). Free slab objects and the per-CPU chunks' free space are not
    scanned. What stays a root: memblock allocations, page tables, large kmalloc
    pages (nothing in a 6.1 struct page tells them from other compound pages),
    the page cache and other raw pages. (Without the SLUB inventory, all
    allocated RAM but the tracked objects is a root); or
  - untracked="ignore": only what kmemleak takes as roots: kernel .data, .bss,
    ro_after_init, each possible CPU's static per-CPU area, every module's memory
    and per-CPU area, and the task stacks.
Before scanning, the copy is cleaned of what would hide leaks: the allocator's own
pointers to vmalloc areas (vmap_area.va_start, vm_struct.addr: kmemleak instead asks
two references of vmalloc areas), the dead part of every task stack (below its stack
pointer), and the stacks of tasks that died (cached for reuse, or on their way to
vfree). With stack=False
task stacks are not scanned at all.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from . import reach
from .errors import QemuleakError
from .kernel import mm, percpu, slub, tasks, vmalloc
from .kernel.modules import Symbolizer, for_each_module
from .kernel.vmalloc import allocator_words
from .objects import Flags, Kind, ObjectTable
from .reach import Segments
from .report import Frame, Leak
from .snapshot import RamCopy, Snapshot, guest_frozen

_KERNEL_HALF = 1 << 63
_GAP = 1 << 30
UNTRACKED = ("roots", "ignore")


@dataclass
class Options:
    stack: bool = True               # scan task stacks (kmemleak's stack=on)
    untracked: str = "roots"         # see the module docstring
    all_objects: bool = False        # report unreferenced objects from before tracing too


STATES = ("direct leak", "indirect leak", "referenced", "unreferenced, untracked")


@dataclass
class Result:
    """One scan: every unreferenced object, in allocation order."""

    leaks: list[Leak]
    objects: int
    bytes_scanned: int
    time: float
    paused_s: float
    duration_s: float
    waves: int
    # per object, in address order: for `dump`
    addresses: np.ndarray = field(repr=False, default=None)
    counts: np.ndarray = field(repr=False, default=None)
    states: np.ndarray = field(repr=False, default=None)   # index into STATES, per object
    contents: Segments = field(repr=False, default=None)
    roots: Segments = field(repr=False, default=None)
    ram: RamCopy = field(repr=False, default=None)       # valid until the next freeze
    root_words: np.ndarray = field(repr=False, default=None)
    untag: object = field(repr=False, default=None)
    _ends: np.ndarray = field(repr=False, default=None)
    _named: Segments = field(repr=False, default=None)     # owner: index in _names
    _names: list = field(repr=False, default=None)
    _where: list = field(repr=False, default=None)         # per name: address -> text
    # seconds per step: "kernel" (walking the kernel's structures and inventories
    # in the copy), "reach" (the reachability scan), "report" (leaks and their records)
    steps_s: dict = field(default_factory=dict)
    threads: int = 1          # threads the reach step ran on

    def state_of(self, address: int) -> tuple[str, int] | None:
        """("direct leak" | "indirect leak" | "referenced", references found) of the
        object starting at `address` in this scan."""
        i = int(np.searchsorted(self.addresses, np.uint64(address)))
        if i < len(self.addresses) and int(self.addresses[i]) == address:
            return STATES[self.states[i]], int(self.counts[i])
        return None

    def why(self, address: int) -> list[str]:
        """Where the words pointing into the object at `address` are: in which
        object (and its state), in a root, or in a register. One line each."""
        i = int(np.searchsorted(self.addresses, np.uint64(address)))
        if i >= len(self.addresses) or int(self.addresses[i]) != address:
            return [f"{address:#x} is no tracked object"]
        end = address + max(int(self._ends[i] - self.addresses[i]), 1)
        out = []
        for owner, at in reach.referrers(self.ram.data, address, end, self.contents,
                                         self.roots, self.root_words, self.untag):
            if owner == -2:
                out.append("a vCPU register or a cached stack")
            elif owner == -1:
                out.append(f"{self._root_name(at)}, word at guest physical "
                           f"{int(self.ram.gpas([at])[0]):#x}")
            elif owner != i:
                where = f"word at guest physical {int(self.ram.gpas([at])[0]):#x}"
                root = self._root_name(at)
                if root != "untracked memory":
                    # a root inside an object: a task's stack vmalloc'd while
                    # tracing is both; the root says more
                    out.append(f"{root}, {where} (in object {int(self.addresses[owner]):#x})")
                else:
                    out.append(f"{STATES[self.states[owner]]} object "
                               f"{int(self.addresses[owner]):#x} ({where})")
        return out

    def _root_name(self, at: int) -> str:
        n = self._named
        hit = np.flatnonzero((n.offset <= at) & (at < n.offset + n.length))
        if not len(hit):
            return "untracked memory"
        owner = int(n.owner[hit[0]])
        name = self._names[owner]
        where = self._where[owner] if self._where else None
        if where is not None:                 # the variable holding the word
            first = int(n.offset[n.owner == owner].min())
            name += f" ({where(at - first)})"
        return name


def to_ram(kernel, ram: RamCopy, owner, va, length) -> Segments:
    """Kernel virtual segments as segments of the RAM copy: split where the page
    tables or the RAM ranges split them; what is not mapped RAM is dropped."""
    owner, va, length = (np.asarray(a, np.int64 if a is not va else np.uint64).reshape(-1)
                         for a in (owner, va, length))
    keep = (va >= np.uint64(_KERNEL_HALF)) & (length > 0)
    if not keep.all():
        owner, va, length = owner[keep], va[keep], length[keep]
    if not len(va):
        return Segments.empty()
    order = np.argsort(va, kind="stable")
    owner, va, length = owner[order], va[order], length[order]
    end = va + length.astype(np.uint64)
    reach_end = np.maximum.accumulate(end)
    # Walk each run of segments without a gap over 1 GiB alone, not the (huge)
    # gaps between runs; runs are disjoint and in order, so are their pieces.
    after = va[1:] - reach_end[:-1]                 # wraps where a segment overlaps
    gaps = (np.flatnonzero((va[1:] > reach_end[:-1]) & (after > np.uint64(_GAP))) + 1).tolist()
    tables = kernel.guest.page_tables()
    walked = [tables.mapping_arrays(int(va[a]), int(reach_end[b - 1]))
              for a, b in zip([0, *gaps], [*gaps, len(va)])]
    pva, poff, psize = _ram_pieces(ram, *(np.concatenate(m) for m in zip(*walked)))
    if not len(pva):
        return Segments.empty()
    # The last piece starting at or before each segment (-1: none). Segments far
    # outnumber pieces: counting where pieces start beats a search per segment.
    k = np.cumsum(np.bincount(np.searchsorted(va, pva), minlength=len(va) + 1)[:len(va)]) - 1
    kc = np.maximum(k, 0)
    piece_va = pva[kc]
    fits = (k >= 0) & (end <= piece_va + psize[kc].astype(np.uint64))
    inside = Segments(owner, poff[kc] + (va - piece_va).astype(np.int64), length).select(fits)
    cross = np.flatnonzero(~fits)                           # crosses pages: vmalloc
    if not len(cross):
        return inside
    which, offset, size = _cut_at_pieces(pva, poff, psize, va[cross], end[cross], kc[cross])
    # The order callers have always had (a leak's first bytes come from it): per
    # group, the segments inside one piece, then the cut ones. A group ends at a
    # gap over 1 GiB and, as the wrapped difference has it, at an overlap.
    group_starts = np.append(np.flatnonzero(after > np.uint64(_GAP)) + 1, len(va))
    group_end = group_starts[np.searchsorted(group_starts, cross[which], side="right")]
    at = group_end - np.searchsorted(cross, group_end)      # fitting segments before it
    return Segments(np.insert(inside.owner, at, owner[cross[which]]),
                    np.insert(inside.offset, at, offset), np.insert(inside.length, at, size))


def _ram_pieces(ram: RamCopy, va: np.ndarray, pa: np.ndarray,
                size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mapped pieces (va, pa, size) cut to the RAM ranges, as (va, offset in the
    RAM copy, size), in address order."""
    pa, size = pa.astype(np.int64), size.astype(np.int64)
    parts = []
    for r in ram.ranges:
        lo, hi = np.maximum(pa, r.gpa), np.minimum(pa + size, r.end)
        ok = lo < hi
        lo, hi = lo[ok], hi[ok]
        parts.append((va[ok] + (lo - pa[ok]).astype(np.uint64), lo + (r.offset - r.gpa), hi - lo))
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pva, poff, psize = (np.concatenate(p) for p in zip(*parts))
    order = np.lexsort((psize, poff, pva))
    return pva[order], poff[order], psize[order]


def _cut_at_pieces(pva: np.ndarray, poff: np.ndarray, psize: np.ndarray, lo: np.ndarray,
                   hi: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments [lo, hi) cut where the pieces (from `first` on) cut them, the parts
    outside every piece dropped: (segment index, offset, length) per part, by
    segment, then address."""
    stop = np.searchsorted(pva, hi, side="left")            # pieces starting before hi
    count = np.maximum(stop - first, 0)
    which = np.repeat(np.arange(len(lo)), count)
    j = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count - first, count)
    s = np.maximum(lo[which], pva[j])
    e = np.minimum(hi[which], pva[j] + psize[j].astype(np.uint64))
    ok = s < e
    which, j, s, e = which[ok], j[ok], s[ok], e[ok]
    return which, poff[j] + (s - pva[j]).astype(np.int64), (e - s).astype(np.int64)


def _object_contents(kernel, ram, addresses, sizes, kinds, cpus) -> Segments:
    """Where each object's bytes are in the RAM copy (per-CPU objects: every
    possible CPU's copy)."""
    index = np.arange(len(addresses), dtype=np.int64)
    is_pcpu = kinds == int(Kind.PERCPU)
    owner, va, length = [index[~is_pcpu]], [addresses[~is_pcpu]], [sizes[~is_pcpu]]
    if is_pcpu.any():
        for cpu in cpus:
            off = np.uint64(kernel.percpu_offset(cpu))
            owner.append(index[is_pcpu])
            va.append(addresses[is_pcpu] + off)
            length.append(sizes[is_pcpu])
    return to_ram(kernel, ram, np.concatenate(owner), np.concatenate(va),
                  np.concatenate(length).astype(np.int64))


def _stack_spans(kernel, snapshot: Snapshot, stack_on: bool,
                 busy: "list[vmalloc.VmapArea] | None" = None):
    """(live, dead, cached): stack spans in use, as (start, size, "stack of COMM
    [PID]"), from each task's stack pointer up; garbage spans, as (start, size),
    below it (whole stacks with stack=off, and the stacks of tasks that exited:
    cached for reuse, or on their way to vfree); and those dead stacks' addresses:
    what holds them (the cache's vm_struct pointer, an RCU list's pointer into
    them) is masked or unknown, so they are referenced explicitly."""
    size = tasks.thread_size(kernel)
    arch = kernel.guest.arch
    running: dict[int, int] = {}
    for cpu, regs in enumerate(snapshot.registers):
        try:
            running[tasks.current_task(kernel, cpu)] = regs[arch.sp_reg]
        except QemuleakError:
            continue
    live, dead, cached = [], [], []
    listed = set()
    for thread in tasks.threads(kernel):
        t, base = thread.task, thread.stack
        if not base:
            continue
        listed.add(base)
        sp = running.get(t.address)
        if sp is None or not base <= sp < base + size:
            sp = thread.saved_sp if t.address not in running else None
        if sp is None or not base <= sp <= base + size:
            sp = base                        # unknown: all of it may be live
        if not stack_on:
            sp = base + size
        dead.append((base, sp - base))
        live.append((sp, base + size - sp, f"stack of {t.comm} [{t.pid}]"))
    if kernel.symbols.get("cached_stacks") is not None:
        addr_off = kernel.types.offsetof("struct vm_struct", "addr")
        sym = kernel.symbols.lookup(kernel.sym("cached_stacks"))
        n = sym.size // 8 if sym is not None and sym.size else 2       # NR_CACHED_STACKS
        for cpu in percpu.possible_cpus(kernel):
            at = kernel.percpu("cached_stacks", cpu)
            for i in range(n):
                vm = kernel.read_u64(at + 8 * i)
                if vm:
                    cached.append(kernel.read_u64(vm + addr_off))
                    dead.append((cached[-1], size))
    for base in _unlisted_stacks(kernel, busy, size, listed | set(cached)):
        cached.append(base)
        dead.append((base, size))
    return live, dead, cached


# the functions a task stack's vm_struct.caller may be in: alloc_thread_stack_node,
# or where the compiler inlined it (Debian's 6.1 and 6.12: kernel_clone, fork_idle)
STACK_ALLOCATORS = {"alloc_thread_stack_node", "dup_task_struct", "copy_process",
                    "kernel_clone", "_do_fork", "fork_idle", "create_io_thread"}


def _unlisted_stacks(kernel, busy: "list[vmalloc.VmapArea] | None", size: int,
                     known: set[int]) -> list[int]:
    """vmalloc'd task stacks no listed task uses and not in `known`: an exited task's,
    waiting for an RCU grace period (free_thread_stack()) or a deferred vfree, or a
    task's that already left the task list on its way out. Their words are a dead
    task's, no roots; the area is the stack allocator's, no leak."""
    if busy is None:
        return []
    areas = [a for a in busy if a.vm and a.start not in known
             and size <= a.end - a.start <= size + 4096]
    if not areas:
        return []
    index, _ = kernel.symbols.lookup_many([a.caller for a in areas])
    allocator = {i for i in set(index.tolist())
                 if i >= 0 and kernel.symbols.symbol(i).name.split(".")[0] in STACK_ALLOCATORS}
    return [a.start for a, i in zip(areas, index.tolist()) if i in allocator]


def _kernel_roots(kernel, live_stacks) -> list[tuple[int, int, str]]:
    """kmemleak's roots, as (start, size, what) of kernel virtual memory."""
    sym = kernel.symbols.get
    out = []
    for lo, hi, what in (("_sdata", "_edata", "kernel .data"),
                         ("__bss_start", "__bss_stop", "kernel .bss"),
                         ("__start_ro_after_init", "__end_ro_after_init", "ro_after_init")):
        if sym(lo) is not None and sym(hi) is not None:
            out.append((sym(lo), sym(hi) - sym(lo), what))
    if not out:
        raise QemuleakError("the kernel's data and bss sections are unknown",
                            "pass --vmlinux or --system-map")
    cpus = percpu.possible_cpus(kernel)
    out += [(s, n, f"static per-CPU area of CPU {c}")
            for c, (s, n) in zip(cpus, percpu.static_areas(kernel))]
    for m in for_each_module(kernel):
        out += [(s, n, f"module {m.name}") for s, n in m.regions]
        if m.percpu and m.percpu_size:
            out += [((m.percpu + kernel.percpu_offset(c)) & (2**64 - 1), m.percpu_size,
                     f"per-CPU area of module {m.name}, CPU {c}") for c in cpus]
    return out + list(live_stacks)


@dataclass
class Untracked:
    """Live objects the table lacks (allocated before tracing), from the
    inventories: SLUB's objects, vmalloc's areas and the per-CPU allocator's
    areas, in address order (per-CPU ones by their per-CPU pointer)."""

    inventory: "slub.Inventory"
    addresses: np.ndarray          # uint64
    sizes: np.ndarray              # int64
    kinds: np.ndarray              # Kind
    flags: np.ndarray              # Flags: NOT_LEAK for per-CPU areas
    callers: np.ndarray            # uint64: vm_struct.caller, 0 if unknown
    cache: np.ndarray              # index in cache_names, -1 for none
    cache_names: list[str]


def _allocators(kernel, ram: RamCopy, inv, needed: bool):
    """(struct pages, per-CPU chunk map, SLUB inventory) of the snapshot, each
    None where the kernel's structures cannot be read; `needed`: the scan cannot do
    without the struct pages (its roots come from them)."""
    try:
        pages = mm.Pages(kernel, ram.ranges)
    except QemuleakError:
        if needed:
            raise
        return None, None, None
    try:
        chunks = percpu.chunk_map(kernel)
    except QemuleakError:
        chunks = None
    if inv is None:
        try:
            inv = slub.inventory(kernel, ram, pages)
        except QemuleakError:
            inv = None
    return pages, chunks, inv


def _gone(kernel, pages: mm.Pages, inv, busy, chunks, addresses: np.ndarray,
          kinds: np.ndarray) -> np.ndarray:
    """Which tracked objects the snapshot's allocators hold free: freed while the
    tracer was not looking (after tracing stopped, say). A slab object on its
    slab's freelists, or whose page went back to the page allocator (a destroyed
    cache's do); a page allocation whose page is free; a vmalloc area no busy area
    starts at; a per-CPU area no chunk holds. `inv`, `busy`, `chunks`: None where
    unknown (nothing of that allocator is then gone). Only what is found free
    counts: an object where the slab's geometry puts none (KFENCE's) is kept."""
    gone = np.zeros(len(addresses), bool)
    linear = kernel.guest.arch.linear_offset(kernel)
    lowmem = np.isin(kinds, [int(Kind.KMALLOC), int(Kind.CACHE), int(Kind.PAGE)])
    if linear is not None and lowmem.any():
        i = np.flatnonzero(lowmem)
        va = addresses[i]
        gpa = va - np.uint64(linear)
        gone[i] = (pages.slab_cache(gpa) == 0) & pages.free_at(gpa)
        if inv is not None and len(inv.free_objects):
            gone[i] |= np.isin(va, inv.free_objects)
    vm = kinds == int(Kind.VMALLOC)
    if busy is not None and vm.any():
        gone[vm] = ~np.isin(addresses[vm], np.array([a.start for a in busy], np.uint64))
    pc = kinds == int(Kind.PERCPU)
    if chunks is not None and pc.any():
        gone[pc] = ~np.isin(addresses[pc], chunks.cookies())
    return gone


def _untracked(kernel, ram: RamCopy, pages: mm.Pages, addresses, sizes, inv,
               exclude: list[tuple[int, int]], busy, percpu_chunks) -> Untracked:
    """The inventoried objects that no tracked object holds. `inv`: the snapshot's
    SLUB inventory. vmalloc areas overlapping `exclude` (roots: module memory,
    task stacks) stay roots. `busy`: the busy vmap areas, or None;
    `percpu_chunks`: the per-CPU allocator's map, or None."""
    areas = vmalloc.allocations(kernel, busy) if busy is not None else []
    start = np.array([a for a, _, _ in areas], np.uint64)
    size = np.array([n for _, n, _ in areas], np.int64)
    keep = ~_overlapping(start, start + size.astype(np.uint64), exclude)
    pcpu = percpu_chunks.cookies() if percpu_chunks is not None else np.zeros(0, np.uint64)
    counts = (len(inv.addresses), int(keep.sum()), len(pcpu))
    fill = lambda values: np.concatenate([np.full(n, v) for n, v in zip(counts, values)])  # noqa: E731
    extra = np.concatenate([inv.addresses.astype(np.uint64), start[keep], pcpu])
    order = np.argsort(extra, kind="stable")
    u = Untracked(
        inv, extra[order],
        np.concatenate([inv.sizes.astype(np.int64), size[keep],
                        percpu_chunks.size if percpu_chunks is not None else []])[order],
        fill([int(Kind.CACHE), int(Kind.VMALLOC), int(Kind.PERCPU)])[order],
        # kmemleak scans per-CPU areas always and never reports them: they are
        # reached through per-CPU pointers and per_cpu_ptr() results alike
        fill([0, 0, int(Flags.NOT_LEAK)])[order],
        np.concatenate([np.zeros(counts[0], np.uint64),
                        np.array([c for _, _, c in areas], np.uint64)[keep],
                        np.zeros(counts[2], np.uint64)])[order],
        np.concatenate([np.asarray(inv.cache, np.int64), np.full(sum(counts[1:]), -1)])[order],
        [c.name for c in inv.caches])
    # a tracked object may sit in a slot (the tracer knows its real size)
    j = np.searchsorted(addresses, u.addresses, side="right").astype(np.int64) - 1
    if len(addresses):
        inside = (j >= 0) & (u.addresses < (addresses + sizes)[np.maximum(j, 0)])
        for f in ("addresses", "sizes", "kinds", "flags", "callers", "cache"):
            setattr(u, f, getattr(u, f)[~inside])
    return u


def _busy_vmap_areas(kernel) -> "list[vmalloc.VmapArea] | None":
    """The busy vmap areas, walked once per scan (objects and cleaning both need
    them), or None when the kernel's vmalloc lists cannot be found."""
    try:
        return vmalloc.for_each_vmap_area(kernel)
    except QemuleakError:
        return None


def _overlapping(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which [start, end) ranges overlap any of `spans` (start, size)."""
    if not spans or not len(starts):
        return np.zeros(len(starts), bool)
    s = np.array(sorted(spans), np.uint64)
    reach_end = np.maximum.accumulate(s[:, 0] + s[:, 1])
    j = np.searchsorted(s[:, 0], ends, side="left").astype(np.int64) - 1
    return (j >= 0) & (reach_end[np.maximum(j, 0)] > starts)


def _merge(addresses: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted union, the order that sorts `concatenate([addresses, extra])`)."""
    both = np.concatenate([addresses, extra.astype(addresses.dtype)])
    order = np.argsort(both, kind="stable")
    return both[order], order


def _allocated_ram(ram: RamCopy, pages: mm.Pages, but: list[np.ndarray] | None = None) -> Segments:
    """Every page of RAM the page allocator does not hold free (nor marked in
    `but`, per RAM range a bool per page), as segments."""
    offsets, lengths = [], []
    for i, (r, free) in enumerate(zip(ram.ranges, pages.free())):
        if but is not None:
            free = free | but[i]
        edges = np.flatnonzero(np.diff(np.concatenate(([1], free.astype(np.int8), [1]))))
        starts, stops = edges[::2], edges[1::2]          # runs of allocated pages
        offsets.append(r.offset + starts * mm.PAGE)
        lengths.append((stops - starts) * mm.PAGE)
    offsets, lengths = np.concatenate(offsets), np.concatenate(lengths)
    return Segments.of(np.full(len(offsets), -1), offsets, lengths)


def slab_caches(kernel) -> dict[int, int]:
    """Every kmem_cache on `slab_caches`: address -> object size."""
    try:
        return {c.address: c.object_size for c in slub.caches(kernel)}
    except QemuleakError:
        return {}


def _freed_slab_objects(kernel, ram: RamCopy, pages: mm.Pages, freed: dict[int, int],
                        starts: np.ndarray, ends: np.ndarray) -> Segments:
    """Slab objects freed while tracing and not allocated again, as segments: their
    stale contents are no roots. Only objects still in a slab of a known cache
    count, at that cache's object size, and none overlapping a live object."""
    if not freed:
        return Segments.empty()
    caches = slab_caches(kernel)
    if not caches:
        return Segments.empty()
    va = np.fromiter(freed.keys(), np.uint64, len(freed))
    where = to_ram(kernel, ram, np.arange(len(va)), va, np.ones(len(va), np.int64))
    va = va[where.owner]
    cache = pages.slab_cache(ram.gpas(where.offset))
    known = np.array(sorted(caches), np.uint64)
    sizes = np.array([caches[c] for c in sorted(caches)], np.int64)
    k = np.searchsorted(known, cache)
    kc = np.minimum(k, len(known) - 1)
    ok = known[kc] == cache
    va, size = va[ok], sizes[kc[ok]]
    end = va + size.astype(np.uint64)
    j = np.searchsorted(starts, end, side="left").astype(np.int64) - 1
    overlaps = (j >= 0) & (ends[np.maximum(j, 0)] > va)
    va, size = va[~overlaps], size[~overlaps]
    return to_ram(kernel, ram, np.full(len(va), -1), va, size)


def _free_percpu(kernel, ram: RamCopy, chunks: "percpu.ChunkMap", cpus) -> Segments:
    """The per-CPU chunks' free space on every CPU: stale words of freed per-CPU
    areas, no roots."""
    va = chunks.free_base + chunks.free_start.astype(np.uint64)
    return to_ram(kernel, ram, np.full(len(va) * len(cpus), -1),
                  np.concatenate([va + np.uint64(kernel.percpu_offset(c)) for c in cpus]),
                  np.tile(chunks.free_size, len(cpus)))


def _zero(ram: RamCopy, segments: Segments) -> None:
    for off, n in zip(segments.offset.tolist(), segments.length.tolist()):
        ram.data[off:off + n] = 0


def hz(kernel) -> int:
    """The guest's HZ, from tick_nsec (nanoseconds per jiffy); 250 (Debian's and
    buildroot's defaults) when the symbol is unknown."""
    at = kernel.symbols.get("tick_nsec")
    if at is not None:
        tick = kernel.read_u64(at)
        if 100_000 <= tick <= 100_000_000:
            return round(1e9 / tick)
    return 250


def scan(kernel, table: ObjectTable, snapshot: Snapshot, options: Options = Options(),
         symbolizer: Symbolizer | None = None, freed: dict[int, int] | None = None,
         inventory: "slub.Inventory | None" = None) -> Result:
    """Find the unreferenced objects of `table` in `snapshot`. `freed`: what the
    tracer saw freed and not allocated again (address -> size). `inventory`: the
    snapshot's SLUB inventory, when the caller has read it already. The copy in the
    snapshot is modified (cleaned, see the module docstring)."""
    if options.untracked not in UNTRACKED:
        raise QemuleakError(f"unknown untracked-memory mode {options.untracked!r}",
                            f"use one of {', '.join(UNTRACKED)}")
    started = time.perf_counter()
    addresses, sizes = table.arrays()
    kinds, flags, seqs = table.columns("kind", "flags", "seq")
    tracked = np.ones(len(addresses), bool)
    guest = kernel.guest
    ram = snapshot.ram
    untracked = None
    with guest_frozen(guest, snapshot):
        busy = _busy_vmap_areas(kernel)
        live, dead, cached = _stack_spans(kernel, snapshot, options.stack, busy)
        spans = _kernel_roots(kernel, live)
        cpus = percpu.possible_cpus(kernel)
        pages, chunks, inv = _allocators(kernel, ram, inventory, options.untracked == "roots")
        if pages is not None:
            # what the tracer saw allocated but the allocators hold free now
            alive = ~_gone(kernel, pages, inv, busy, chunks, addresses, kinds)
            addresses, sizes, kinds, flags, seqs, tracked = (
                a[alive] for a in (addresses, sizes, kinds, flags, seqs, tracked))
        if options.untracked == "roots" and inv is not None:
            untracked = _untracked(kernel, ram, pages, addresses, sizes, inv,
                                   [(a, n) for a, n, _ in spans] + dead, busy, chunks)
        extra = np.full(len(addresses), -1)     # index in `untracked`, per object
        if untracked is not None:
            # objects from before tracing are objects too (reported only with `all`)
            u = untracked
            n = len(u.addresses)
            addresses, order = _merge(addresses, u.addresses)
            sizes = np.concatenate([sizes, u.sizes.astype(sizes.dtype)])[order]
            kinds = np.concatenate([kinds, u.kinds.astype(kinds.dtype)])[order]
            flags = np.concatenate([flags, u.flags.astype(flags.dtype)])[order]
            seqs = np.concatenate([seqs, np.full(n, np.iinfo(seqs.dtype).max, seqs.dtype)])[order]
            tracked = np.concatenate([tracked, np.zeros(n, bool)])[order]
            extra = np.concatenate([np.full(len(order) - n, -1), np.arange(n)])[order]
        contents = _object_contents(kernel, ram, addresses, sizes, kinds, cpus)
        meta = allocator_words(kernel, busy)
        ends = addresses + sizes
        named = to_ram(kernel, ram, np.arange(len(spans)), [s for s, _, _ in spans],
                       [n for _, n, _ in spans])
        if untracked is not None:
            # allocated RAM but the slabs: their free objects hold only stale words
            # (vmalloc areas held as objects: a root word in an object is no root)
            roots = _allocated_ram(ram, pages, but=untracked.inventory.slab_pages)
            stale = _free_percpu(kernel, ram, chunks, cpus) if chunks is not None \
                else Segments.empty()
        elif options.untracked == "roots":
            roots = _allocated_ram(ram, pages)
            stale = _freed_slab_objects(kernel, ram, pages, freed or {}, addresses, ends)
        else:
            roots = Segments(np.full(len(named), -1), named.offset, named.length)
            stale = Segments.empty()
        cleaned = to_ram(kernel, ram, np.full(len(dead) + len(meta), -1),
                         [s for s, _ in dead] + meta, [n for _, n in dead] + [8] * len(meta))
        now_jiffies = kernel.read_u64(kernel.sym("jiffies")) if kernel.symbols.get("jiffies") else 0
        ticks = hz(kernel)
        symbolizer = symbolizer or Symbolizer(kernel)
        symbolizer.refresh()
    walked = time.perf_counter()
    _zero(ram, cleaned)
    _zero(ram, stale)
    registers = np.array([v & (2**64 - 1) for regs in snapshot.registers for v in regs.values()]
                         + cached, np.uint64)
    min_count = np.where(flags & int(Flags.NOT_LEAK), 0, 1)
    scan_ok = (flags & int(Flags.NO_SCAN | Flags.IGNORE)) == 0
    untag = guest.arch.untag_words
    result = reach.reachability(ram.data, addresses, ends, min_count, contents, roots,
                                registers, untag, scan_ok)
    reached = time.perf_counter()
    reportable = ((flags & int(Flags.NOT_LEAK | Flags.IGNORE)) == 0) & \
        (tracked | options.all_objects)
    white = ~result.gray & reportable
    src, dst = reach.leak_edges(ram.data, addresses, ends, contents, white, untag, result)
    direct = reach.classify(white, src, dst, seqs)
    states = np.where(white, np.where(direct, 0, 1),
                      np.where(tracked | result.gray, 2, 3)).astype(np.int8)
    # each leak's first bytes: its first segment
    mine = np.flatnonzero(white[contents.owner])
    first = {}
    for o, off in zip(contents.owner[mine].tolist(), contents.offset[mine].tolist()):
        first.setdefault(o, off)
    leaks = []
    for i in np.flatnonzero(white)[np.argsort(seqs[white], kind="stable")].tolist():
        kind = "direct" if direct[i] else "indirect"
        if extra[i] >= 0:                  # from before tracing: no record
            leaks.append(_untracked_leak(untracked, int(extra[i]), kind, ram, first.get(i),
                                         symbolizer))
            continue
        r = table.get(int(addresses[i]))
        head = min(r.size, 32)
        hexdump = ram.data[first[i]:first[i] + head].tobytes() if i in first else b""
        age = (now_jiffies - r.jiffies) / ticks if now_jiffies >= r.jiffies else 0.0
        leaks.append(Leak(r.address, r.size, r.comm, r.pid, r.cpu, r.jiffies, age, kind,
                          frames(symbolizer, r.backtrace), hexdump, r.seq,
                          r.kind.name.lower(), r.cache))
    done = time.perf_counter()
    return Result(leaks, len(addresses), result.bytes_scanned, snapshot.time, snapshot.paused_s,
                  done - started, result.waves, addresses, result.counts,
                  states, contents, roots, ram, registers, untag, ends, named,
                  [w for _, _, w in spans], _symbolic(kernel, spans, symbolizer),
                  {"kernel": walked - started, "reach": reached - walked, "report": done - reached},
                  result.threads)


def _symbolic(kernel, spans, symbolizer: Symbolizer) -> list:
    """Per root span, a function from an offset in it to the symbol there (the
    kernel's sections and the static per-CPU areas, whose symbols are their CPU-0
    link addresses), or None."""
    pcpu = kernel.symbols.get("__per_cpu_start")
    out = []
    for start, _, what in spans:
        if what.startswith(("kernel .", "ro_after_init")):
            out.append(lambda off, start=start: symbolizer.format(start + off))
        elif what.startswith("static per-CPU area") and pcpu is not None:
            out.append(lambda off: percpu.variable(kernel.symbols, pcpu + off))
        else:
            out.append(None)
    return out


def _untracked_leak(u: Untracked, j: int, kind: str, ram: RamCopy, first: int | None,
                    symbolizer: Symbolizer) -> Leak:
    """A leak allocated before tracing: no comm, pid or age; the backtrace is
    vmalloc's caller when the area has one, else unknown."""
    size = int(u.sizes[j])
    hexdump = ram.data[first:first + min(size, 32)].tobytes() if first is not None else b""
    caller = int(u.callers[j])
    cache = u.cache_names[int(u.cache[j])] if u.cache[j] >= 0 else None
    return Leak(int(u.addresses[j]), size, "", 0, 0, 0, 0.0, kind,
                frames(symbolizer, (caller,) if caller else ()), hexdump, UNTRACKED_SEQ,
                Kind(int(u.kinds[j])).name.lower(), cache)


UNTRACKED_SEQ = 1 << 62       # after every tracked leak


def frames(symbolizer: Symbolizer, backtrace) -> tuple[Frame, ...]:
    """Report frames for return addresses: %pS text, function and module."""
    out = []
    for i, pc in enumerate(backtrace):
        sym = symbolizer.table.lookup(pc)
        source = symbolizer.source(pc, return_address=i > 0)   # the first is the entry PC
        if sym is None:
            out.append(Frame(pc, f"{pc:#x}", None, None, source))
        else:
            out.append(Frame(pc, f"{sym.name}+{pc - sym.address:#x}/{sym.size:#x}",
                             sym.name, sym.module, source))
    return tuple(out)
