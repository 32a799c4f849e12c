"""Where each object's story (comm, pid, CPU, jiffies, backtrace) comes from,
chosen per guest. Under QEMU a breakpoint stop costs about a millisecond, so the
cheapest source the guest offers goes first:

- "tracks": the slab caches keep allocation tracks (SLAB_STORE_USER, from
  `slub_debug=U`). Slab objects get their story from SLUB's own records at scan
  time (`sync`), with no breakpoint on any slab allocation or free. Breakpoints
  stay only where nothing is recorded: large kmalloc pages, vmalloc, per-CPU
  areas and their frees, krealloc (SLUB keeps the first size of an object grown
  in place), module loads and cache creation (a module's new cache is made to
  keep tracks too); and none in a code page of the slab fast paths but while a
  module's init runs (see HOT, tracks_probes). comm: from a pid -> comm record
  kept from every stop and scan, and from the freed task_structs of tasks gone
  by the scan.
- "breakpoints": every allocation and free function (tracer.PROBES).

The scan does not care which one filled the table.
"""

from dataclasses import dataclass

import numpy as np

from .errors import QemuleakError
from .kernel import slub, stackdepot, tasks, vmalloc
from .objects import Kind, ObjectTable
from .snapshot import Snapshot, guest_frozen
from .tracer import PROBES, Probe, Tracer

MODES = ("auto", "tracks", "breakpoints")
HINT_BOOT = ("boot the guest with slub_debug=U,kmalloc-* and qemuleak traces with "
             "a few breakpoints instead of one per allocation (about a thousand times faster)")
# What `qemuleak run` adds to the kernel command line unless --append sets slub_debug:
# tracks on the kmalloc caches only (the caches modules create get them at creation).
RUN_SLUB_DEBUG = "slub_debug=U,kmalloc-*"

@dataclass(frozen=True)
class Need:
    """Something SLUB records nothing of, that tracks mode traces: the alternative
    probe sets that see it (the first present is taken). Unless `without` is "",
    its probes are set only while a module's init function runs (Tracer's
    init_probes), and `without` says what the rest of the time lacks."""

    what: str
    choices: tuple[tuple[Probe, ...], ...]
    without: str = ""                 # "": always traced


def needs(probes=PROBES) -> tuple[Need, ...]:
    """Under QEMU 7.2 every breakpoint hit flushes all translated code (gdbstub's
    tb_flush on a debug stop): the guest then runs ~100 ms of a shell workload's
    worth slower, where a bare stop costs 4 ms. So only module loads are always
    traced; the rest only while a module initializes, where its allocations
    happen most."""
    named = lambda *names: tuple(p for p in probes if p.name in names)      # noqa: E731
    large = tuple(p for p in probes if p.role == "alloc" and p.kind == "page")
    return (
        Need("module loads", (tuple(p for p in probes if p.role == "module"),)),
        # (a task stack each fork, when the per-CPU cache of them is empty)
        Need("vmalloc", (tuple(p for p in probes if p.kind == "vmalloc") + named("vfree"),),
             "vmalloc areas have vmalloc's caller for a backtrace, no comm, and an age "
             "counted from the first scan that sees them"),
        # (6.10+: every fork's mm counters)
        Need("per-CPU", (tuple(p for p in probes if p.kind == "percpu") + named("free_percpu"),),
             "per-CPU areas are reported only with --all"),
        # kfree hands a large kmalloc's pages to free_large_kmalloc
        Need("large kmalloc", (large + (Probe("free_large_kmalloc", "free", ptr_arg=1),),),
             "large kmalloc pages count as roots"),
        # SLUB keeps the first size of an object krealloc grows in place
        Need("krealloc", (tuple(p for p in probes if p.role == "realloc"),),
             "an object krealloc grows in place keeps its first size"),
        # A module's new cache is made to keep tracks (see Tracer._cache_create).
        # 6.9+: kmem_cache_create* are macros and inlines calling
        # __kmem_cache_create_args; before, two functions (kmem_cache_create calls
        # kmem_cache_create_usercopy): a module's call is caught where it enters.
        Need("cache creation",
             ((Probe("__kmem_cache_create_args", "cache_create", flags_arg=3),),
              (Probe("kmem_cache_create", "cache_create", flags_arg=3),
               Probe("kmem_cache_create_usercopy", "cache_create", flags_arg=3))),
             "a cache a module creates keeps no tracks unless slub_debug names it"),
        # No breakpoint on task exits either: a task gone by the scan is named from
        # its freed task_struct (tasks.exited).
    )


@dataclass
class TracksProbes:
    """What tracks mode sets on one kernel."""

    probes: tuple[Probe, ...]          # always in
    init_probes: tuple[Probe, ...]     # in only while a module's init runs
    lost: list[str]                    # what that leaves untraced, one phrase each


def tracks_probes(kernel, probes=PROBES) -> TracksProbes:
    """The probes tracks mode sets on this kernel (see needs)."""
    out = TracksProbes((), (), [])
    for need in needs(probes):
        present = [[p for p in choice if kernel.symbols.get(p.name) is not None]
                   for choice in need.choices]
        chosen = tuple(next((c for c in present if c), ()))
        if not need.without:
            out.probes += chosen
        elif chosen:
            out.init_probes += chosen
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
    sync = None
    if tracks:
        sync = TrackSync(kernel, table, tracer.comms, tracer.resized)
        sync.start()
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
                f"{len(probes)} breakpoint{'s' if len(probes) != 1 else ''} ({names})")
        if lost:
            line += ("; vmalloc, per-CPU, large kmalloc, krealloc and cache creation are "
                     "traced while a module's init runs, and after it " + "; ".join(lost))
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
    holds); a new one is added in allocation order; one gone is removed. After
    `start`, vmalloc areas too: one allocated since, that no breakpoint saw, is
    added with vmalloc's caller for a backtrace, its age counted from this sync;
    one gone is removed. Page and per-CPU records are left alone."""

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
        # vmalloc areas at `start`, None before it; `qemuleak scan` takes them all:
        # an area's vm_struct.caller is its story, as a slab object's track is
        self._before: set[tuple[int, int, int]] | None = set() if untracked_too else None

    def start(self) -> None:
        """Tracing starts (the guest stopped): the vmalloc areas there are now
        were allocated before it, and stay out of the table."""
        try:
            self._before = set(vmalloc.allocations(self.kernel))
        except QemuleakError:
            self._before = None

    def __call__(self, snapshot: Snapshot) -> slub.Inventory:
        """Bring the table in line with `snapshot`; its SLUB inventory."""
        kernel, table = self.kernel, self.table
        with guest_frozen(kernel.guest, snapshot):
            inv = slub.inventory(kernel, snapshot.ram)
            tr = slub.alloc_tracks(kernel, snapshot.ram, inv)
            sizes = slub.requested_sizes(kernel, snapshot.ram, inv)
            try:
                # an exited task's last comm, from its freed task_struct; then the
                # live tasks' (a pid may have been taken again)
                self.comms.update(tasks.exited(kernel, inv))
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
        if self._before is not None:
            with guest_frozen(kernel.guest, snapshot):
                self._sync_vmalloc()
        return inv

    def _sync_vmalloc(self) -> None:
        kernel, table = self.kernel, self.table
        try:
            areas = vmalloc.allocations(kernel)
        except QemuleakError:
            return
        busy = {start: (size, caller) for start, size, caller in areas}
        t_addr, _ = table.arrays()
        (t_kind,) = table.columns("kind")
        for a in t_addr[t_kind == int(Kind.VMALLOC)].tolist():
            r = table.get(a)
            size = busy.get(a, (0, 0))[0]
            # (a breakpoint records the size asked for, vmalloc hands out pages)
            if not size or -(-r.size // vmalloc.PAGE) * vmalloc.PAGE != size:
                table.remove(a)
                self.removed += 1
        jiffies = kernel.read_u64(kernel.sym("jiffies")) if kernel.symbols.get("jiffies") else 0
        for start, size, caller in areas:
            if (start, size, caller) not in self._before and table.get(start) is None:
                table.add(start, size, Kind.VMALLOC, jiffies=jiffies,
                          backtrace=(caller,) if caller else ())
                self.added += 1
