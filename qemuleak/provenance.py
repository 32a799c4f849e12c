"""Where each object's story (comm, pid, CPU, jiffies, backtrace) comes from,
chosen per guest. Under QEMU a breakpoint stop costs about a millisecond, so the
cheapest source the guest offers goes first:

- "tracks": the slab caches keep allocation tracks (SLAB_STORE_USER, from
  `slub_debug=U`). Slab objects get their story from SLUB's own records at scan
  time (`sync`), with no breakpoint on any slab allocation or free. Breakpoints
  stay only where nothing is recorded: large kmalloc pages, vmalloc, per-CPU
  areas and their frees, krealloc (SLUB keeps the first size of an object grown
  in place), module loads, cache creation (a module's new cache is made to keep
  tracks too) and task exits (the comm of a pid that is gone by the scan); and
  none in a code page of the slab fast paths but while a module's init runs
  (see HOT, tracks_probes).
- "breakpoints": every allocation and free function (tracer.PROBES).

The scan does not care which one filled the table.
"""

from dataclasses import dataclass

import numpy as np

from .errors import QemuleakError
from .kernel import slub, stackdepot, tasks
from .objects import Kind, ObjectTable
from .snapshot import Snapshot, guest_frozen
from .tracer import PROBES, Probe, Tracer

MODES = ("auto", "tracks", "breakpoints")
HINT_BOOT = ("boot the guest with slub_debug=U,kmalloc-* and qemuleak traces with "
             "a few breakpoints instead of one per allocation (about a thousand times faster)")
# What `qemuleak run` adds to the kernel command line unless --append sets slub_debug:
# tracks on the kmalloc caches only (the caches modules create get them at creation).
RUN_SLUB_DEBUG = "slub_debug=U,kmalloc-*"

# Every slab allocation and free runs through one of these (6.1 names, then the
# *_noprof ones of 6.10+). QEMU cuts every translated block in a page holding a
# breakpoint to one instruction, so tracks mode sets none in their pages: one
# breakpoint never hit there made allocstorm 2.3x slower.
HOT = ("kmalloc_trace", "kmalloc_node_trace", "__kmalloc", "__kmalloc_node",
       "__kmalloc_node_track_caller", "kfree", "kmem_cache_alloc", "kmem_cache_alloc_lru",
       "kmem_cache_alloc_node", "kmem_cache_free", "__kmem_cache_alloc_node",
       "__kmem_cache_free", "kmem_cache_alloc_bulk", "kmem_cache_free_bulk", "___slab_alloc",
       "__slab_free", "__kmalloc_noprof", "__kmalloc_node_noprof",
       "__kmalloc_cache_noprof", "__kmalloc_cache_node_noprof",
       "__kmalloc_node_track_caller_noprof", "kmem_cache_alloc_noprof",
       "kmem_cache_alloc_lru_noprof", "kmem_cache_alloc_node_noprof")
PAGE_SHIFT = 12


@dataclass(frozen=True)
class Need:
    """Something tracks mode traces because SLUB records nothing of it: the
    alternative probe sets that see it. The first whose probes all sit in cold
    pages is taken; when none does, the first present is set only while a
    module's init function runs (Tracer's init_probes), and `without` says what
    is lost the rest of the time."""

    what: str
    choices: tuple[tuple[Probe, ...], ...]
    without: str = ""                 # "": always traced, wherever it sits


def needs(probes=PROBES) -> tuple[Need, ...]:
    named = lambda *names: tuple(p for p in probes if p.name in names)      # noqa: E731
    large = tuple(p for p in probes if p.role == "alloc" and p.kind == "page")
    return (
        Need("vmalloc", (tuple(p for p in probes if p.kind == "vmalloc") + named("vfree"),)),
        Need("per-CPU", (tuple(p for p in probes if p.kind == "percpu") + named("free_percpu"),)),
        # kfree hands a large kmalloc's pages to free_large_kmalloc
        Need("large kmalloc", (large + (Probe("free_large_kmalloc", "free", ptr_arg=1),),),
             "large kmalloc pages allocated after a module's init count as roots"),
        # SLUB keeps the first size of an object krealloc grows in place
        Need("krealloc", (tuple(p for p in probes if p.role == "realloc"),),
             "an object krealloc grows in place after a module's init keeps its first size"),
        # A module's new cache is made to keep tracks (see Tracer._cache_create).
        # 6.9+: kmem_cache_create* are macros and inlines calling
        # __kmem_cache_create_args; before, two functions (kmem_cache_create calls
        # kmem_cache_create_usercopy): a module's call is caught where it enters.
        Need("cache creation",
             ((Probe("__kmem_cache_create_args", "cache_create", flags_arg=3),),
              (Probe("kmem_cache_create", "cache_create", flags_arg=3),
               Probe("kmem_cache_create_usercopy", "cache_create", flags_arg=3))),
             "a cache a module creates after its init keeps no tracks unless slub_debug "
             "names it"),
        Need("module loads", (tuple(p for p in probes if p.role == "module"),)),
        # A task that allocated and exited before the next scan: its comm, by pid.
        Need("task exits", ((Probe("do_exit", "task_exit"),),)),
    )


def hot_pages(kernel) -> set[int]:
    """The code pages of the slab fast paths (HOT)."""
    pages = set()
    for name in HOT:
        at = kernel.symbols.get(name)
        if at is None:
            continue
        sym = kernel.symbols.lookup(at)
        size = sym.size if sym is not None and sym.size else 1
        pages.update(range(at >> PAGE_SHIFT, ((at + size - 1) >> PAGE_SHIFT) + 1))
    return pages


@dataclass
class TracksProbes:
    """What tracks mode sets on one kernel."""

    probes: tuple[Probe, ...]          # always in
    init_probes: tuple[Probe, ...]     # in only while a module's init runs
    lost: list[str]                    # what that leaves untraced, one phrase each


def tracks_probes(kernel, probes=PROBES) -> TracksProbes:
    """The probes tracks mode sets on this kernel: none in a slab fast path's page
    but while a module initializes (see Need)."""
    hot = hot_pages(kernel)
    out = TracksProbes((), (), [])
    for need in needs(probes):
        present = [[p for p in choice if kernel.symbols.get(p.name) is not None]
                   for choice in need.choices]
        cold = [c for c in present if c and all(
            kernel.symbols.get(p.name) >> PAGE_SHIFT not in hot for p in c)]
        if cold or not need.without:
            out.probes += tuple(cold[0] if cold else next((c for c in present if c), ()))
        elif any(present):
            out.init_probes += tuple(next(c for c in present if c))
            out.lost.append(need.without)
    return out


@dataclass
class Watch:
    """What fills an object table in one mode: the tracer, and in tracks mode the
    TrackSync to call with each snapshot; `lost`: see TracksProbes."""

    tracer: Tracer
    sync: "TrackSync | None"
    lost: list[str]


def watch(kernel, mode: str, table: ObjectTable, **tracer_args) -> Watch:
    """The tracer (its breakpoints chosen for `mode`, "tracks" or "breakpoints")
    and, in tracks mode, the TrackSync that fill `table`."""
    tracks = mode == "tracks"
    chosen = tracks_probes(kernel) if tracks else TracksProbes(PROBES, (), [])
    tracer = Tracer(kernel, table, chosen.probes, init_probes=chosen.init_probes, **tracer_args)
    sync = TrackSync(kernel, table, tracer.comms, tracer.resized) if tracks else None
    return Watch(tracer, sync, chosen.lost)


def tracked_caches(kernel) -> list[str]:
    """Names of the slab caches that keep allocation tracks."""
    return [c.name for c in slub.caches(kernel) if c.tracks is not None]


def choose(kernel, requested: str = "auto") -> str:
    """"tracks" or "breakpoints" for this guest. auto: tracks when the kmalloc
    caches keep them. An explicit "tracks" on a guest without them is an error."""
    if requested not in MODES:
        raise QemuleakError(f"unknown provenance {requested!r}", f"use one of {', '.join(MODES)}")
    if requested == "breakpoints":
        return requested
    try:
        names = tracked_caches(kernel)
    except QemuleakError:
        names = []
    if any(n.startswith("kmalloc-") for n in names):
        return "tracks"
    if requested == "tracks":
        raise QemuleakError("the guest's kmalloc caches keep no allocation tracks",
                            "boot it with slub_debug=U,kmalloc-* (or use --provenance breakpoints)")
    return "breakpoints"


def describe(mode: str, kernel, probes, lost: list[str] = ()) -> str:
    """The start-up line that says where provenance comes from. `probes`: the
    tracer's; `lost`: what tracks mode leaves untraced (see tracks_probes)."""
    if mode == "tracks":
        try:
            n = len(tracked_caches(kernel))
        except QemuleakError:
            n = 0
        names = ", ".join(sorted({p.name for p in probes}))
        line = (f"tracing with SLUB's allocation tracks ({n} caches keep them) and "
                f"{len(probes)} breakpoints ({names})")
        if lost:
            line += ("; others share a slab fast path's code page and are set only while "
                     "a module's init runs: " + "; ".join(lost))
        return line
    probes = len(probes)
    return (f"tracing with breakpoints on {probes} allocator functions (the guest keeps "
            f"no allocation tracks: {HINT_BOOT})")


def _kinds(inv: slub.Inventory) -> np.ndarray:
    """Per object: KMALLOC for kmalloc caches, else CACHE."""
    per_cache = np.array([int(Kind.KMALLOC) if c.is_kmalloc else int(Kind.CACHE)
                          for c in inv.caches], np.int64)
    return per_cache[inv.cache] if len(per_cache) else np.zeros(0, np.int64)


class TrackSync:
    """Keeps an ObjectTable's slab objects equal to what the snapshot's slab
    caches hold with tracks. An object whose track is unchanged keeps its record
    (its sequence number, so it is reported once, and its flags, so `clear`
    holds); a new one is added in allocation order; one gone is removed. Records
    of other kinds (the breakpoints' vmalloc, page and per-CPU objects) are left
    alone."""

    def __init__(self, kernel, table: ObjectTable, comms: dict[int, str],
                 resized: dict[int, int], untracked_too: bool = False):
        """`comms`: pid -> comm seen so far (kept up to date here too); `resized`:
        address -> new size of objects krealloc grew in place since the last sync;
        `untracked_too`: objects of caches that keep no tracks enter the table too
        (no comm or backtrace), for one trace-free scan (`qemuleak scan`)."""
        self.kernel, self.table, self.comms, self.resized = kernel, table, comms, resized
        self.untracked_too = untracked_too
        self._stacks: dict[int, tuple[int, ...]] = {}     # depot handles never change
        self.added = self.removed = 0
        self.tracks_seen = False          # any object with a track in the last sync

    def __call__(self, snapshot: Snapshot) -> slub.Inventory:
        """Bring the table in line with `snapshot`; its SLUB inventory."""
        kernel, table = self.kernel, self.table
        with guest_frozen(kernel.guest, snapshot):
            inv = slub.inventory(kernel, snapshot.ram)
            tr = slub.alloc_tracks(kernel, snapshot.ram, inv)
            sizes = slub.requested_sizes(kernel, snapshot.ram, inv)
            try:
                self.comms.update((t.pid, t.comm) for t in tasks.for_each_thread(kernel))
            except QemuleakError:
                pass
            keep = np.arange(len(inv.addresses)) if self.untracked_too else np.flatnonzero(tr.stored)
            addr, when, pid = inv.addresses[keep], tr.when[keep], tr.pid[keep]
            t_addr, _ = table.arrays()
            t_kind, t_jiffies, t_pid = table.columns("kind", "jiffies", "pid")
            slab = np.isin(t_kind, [int(Kind.KMALLOC), int(Kind.CACHE)])
            j = np.minimum(np.searchsorted(t_addr, addr), max(len(t_addr) - 1, 0))
            same = np.zeros(len(addr), bool)
            if len(t_addr):
                same = (t_addr[j] == addr) & slab[j] & (t_jiffies[j] == when) & (t_pid[j] == pid)
            stale = slab.copy()
            stale[j[same]] = False
            new = keep[~same]
            handles = [int(h) for h in tr.handle[new] if int(h) and int(h) not in self._stacks]
            if handles:
                self._stacks.update(stackdepot.fetch(kernel, handles))
        for a in t_addr[stale].tolist():
            table.remove(a)
        names = [c.name for c in inv.caches]
        kinds = _kinds(inv)
        for i in new[np.argsort(tr.when[new], kind="stable")].tolist():
            a, p, caller = int(inv.addresses[i]), int(tr.pid[i]), int(tr.caller[i])
            table.add(a, self.resized.get(a, int(sizes[i])), Kind(int(kinds[i])),
                      cache=names[inv.cache[i]],
                      comm=self.comms.get(p, "?") if tr.stored[i] else "", pid=p,
                      cpu=max(int(tr.cpu[i]), 0), jiffies=int(tr.when[i]),
                      backtrace=self._stacks.get(int(tr.handle[i]), (caller,) if caller else ()))
        self.resized.clear()
        self.added, self.removed = len(new), int(stale.sum())
        self.tracks_seen = bool(tr.stored.any())
        return inv
