"""Where each object's story (comm, pid, CPU, jiffies, backtrace) comes from,
chosen per guest. Under QEMU a breakpoint stop costs about a millisecond, so the
cheapest source the guest offers goes first:

- "tracks": the slab caches keep allocation tracks (SLAB_STORE_USER, from
  `slub_debug=U`). Slab objects get their story from SLUB's own records at scan
  time (`sync`), with no breakpoint on any slab allocation or free. Breakpoints
  stay only where nothing is recorded: large kmalloc pages, vmalloc, per-CPU
  areas and their frees, krealloc (SLUB keeps the first size of an object grown
  in place), module loads, cache creation (a module's new cache is made to keep
  tracks too) and task exits (the comm of a pid that is gone by the scan).
- "breakpoints": every allocation and free function (tracer.PROBES).

The scan does not care which one filled the table.
"""

import numpy as np

from .errors import QemuleakError
from .kernel import slub, stackdepot, tasks
from .objects import Kind, ObjectTable
from .snapshot import Snapshot, guest_frozen
from .tracer import PROBES, Probe

MODES = ("auto", "tracks", "breakpoints")
HINT_BOOT = ("boot the guest with slub_debug=U,kmalloc-* and qemuleak traces with "
             "a few breakpoints instead of one per allocation (about a thousand times faster)")
# What `qemuleak run` adds to the kernel command line unless --append sets slub_debug:
# tracks on the kmalloc caches only (the caches modules create get them at creation).
RUN_SLUB_DEBUG = "slub_debug=U,kmalloc-*"

# Frees of what tracks mode still traces; kfree and kmem_cache_free are left alone
# (every slab free goes through them), and a large kmalloc's free is caught where
# kfree hands it on.
_TRACKS_FREES = ("vfree", "free_percpu", "free_large_kmalloc")
TRACKS_EXTRA = (
    Probe("free_large_kmalloc", "free", ptr_arg=1),          # (folio, object)
    # A module's call is caught where it enters: 6.9+ kmem_cache_create* are
    # macros and inlines calling __kmem_cache_create_args; before, two functions
    # (kmem_cache_create calls kmem_cache_create_usercopy). The flags are the
    # fourth argument of each.
    Probe("__kmem_cache_create_args", "cache_create", flags_arg=3),
    Probe("kmem_cache_create", "cache_create", flags_arg=3),
    Probe("kmem_cache_create_usercopy", "cache_create", flags_arg=3),
    # A task that allocated and exited before the next scan: its comm, by pid.
    Probe("do_exit", "task_exit"),
)


def tracks_probes(probes=PROBES) -> tuple[Probe, ...]:
    """The probes tracks mode keeps: allocations SLUB does not record (kinds page,
    vmalloc, percpu), krealloc, module loads, their frees, cache creation."""
    keep = [p for p in probes
            if p.role in ("realloc", "module")
            or p.role == "alloc" and p.kind in ("page", "vmalloc", "percpu")
            or p.role == "free" and p.name in _TRACKS_FREES]
    return tuple(keep) + TRACKS_EXTRA


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


def describe(mode: str, kernel, probes: int) -> str:
    """The start-up line that says where provenance comes from."""
    if mode == "tracks":
        try:
            n = len(tracked_caches(kernel))
        except QemuleakError:
            n = 0
        return (f"tracing with SLUB's allocation tracks ({n} caches keep them) and "
                f"{probes} breakpoints (large kmalloc, vmalloc, per-CPU, krealloc, module "
                f"loads, cache creation, task exits)")
    return (f"tracing with breakpoints on {probes} allocator functions (the guest keeps "
            f"no allocation tracks: {HINT_BOOT})")


def _kinds(inv: slub.Inventory) -> np.ndarray:
    """Per object: KMALLOC for kmalloc caches, else CACHE."""
    per_cache = np.array([int(Kind.KMALLOC) if c.flags & slub.SLAB_KMALLOC else int(Kind.CACHE)
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
                 resized: dict[int, int]):
        """`comms`: pid -> comm seen so far (kept up to date here too); `resized`:
        address -> new size of objects krealloc grew in place since the last sync."""
        self.kernel, self.table, self.comms, self.resized = kernel, table, comms, resized
        self._stacks: dict[int, tuple[int, ...]] = {}     # depot handles never change
        self.added = self.removed = 0

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
            keep = np.flatnonzero(tr.stored)
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
                      cache=names[inv.cache[i]], comm=self.comms.get(p, "?"), pid=p,
                      cpu=max(int(tr.cpu[i]), 0), jiffies=int(tr.when[i]),
                      backtrace=self._stacks.get(int(tr.handle[i]), (caller,) if caller else ()))
        self.resized.clear()
        self.added, self.removed = len(new), int(stale.sum())
        return inv
