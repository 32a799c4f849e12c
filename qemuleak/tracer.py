"""Trace kernel allocations and frees through gdbstub breakpoints.

At an allocator's first instruction we record the arguments, who runs (comm, pid,
cpu, or "hardirq"/"softirq" as kmemleak says), jiffies, the registers and a copy
of the top of the kernel stack (for the backtrace, unwound later and only when
shown), and plant a breakpoint on the return site. At the return site, matched by
(vCPU, stack pointer) so nested and interleaved calls stay apart, the result is
known and the object enters the table. A free is one stop: its argument leaves the
table.

Calls are matched by stack pointer alone: every task and every CPU's interrupt
stack is a stack of its own, so a stack pointer names one call frame at a time,
even when the task sleeps in the allocator and wakes up on another vCPU (keying
by vCPU too loses those). Return-site breakpoints are removed when no call waits on them.

Cost per traced allocation: two stops and three round trips (`g` at each stop,
`Z0` and `z0` for the return site); a free: one stop and one round trip.
"""

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .errors import GuestConnectionError, QemuleakError
from .kernel import slub, tasks
from .objects import Flags, Kind

STACK_COPY = 4096        # bytes of kernel stack saved per allocation
ZERO_SIZE_PTR = 0x10     # what kmalloc(0) returns: not an object
FREED_LIMIT = 1 << 22    # freed objects remembered (the scanner leaves them out)
HARDIRQ_MASK, SOFTIRQ_OFFSET = 0x000F0000, 0x100
KINDS = {"kmalloc": Kind.KMALLOC, "cache": Kind.CACHE, "vmalloc": Kind.VMALLOC,
         "page": Kind.PAGE, "percpu": Kind.PERCPU}


@dataclass(frozen=True)
class Probe:
    """A traced function: which argument is what."""

    name: str
    role: str                       # "alloc", "alloc_bulk", "realloc", "free", "free_bulk",
                                    # "module", "cache_create"
    kind: str = "kmalloc"           # what it allocates: kmalloc, cache, vmalloc, page
    size_arg: int | None = None
    cache_arg: int | None = None    # kmem_cache *: size is its object_size
    ptr_arg: int | None = None      # free: the object
    count_arg: int | None = None    # free_bulk: how many, and ptr_arg the array
    flags_arg: int | None = None    # cache_create: the new cache's slab_flags_t


# The 6.1 allocation API; the tracer breaks on those the guest's symbols have.
# Inner functions only where outer ones call them, so no object is seen twice.
PROBES = (
    Probe("__kmalloc", "alloc", size_arg=0),
    Probe("__kmalloc_node", "alloc", size_arg=0),
    Probe("__kmalloc_node_track_caller", "alloc", size_arg=0),
    Probe("kmalloc_trace", "alloc", size_arg=2),
    Probe("kmalloc_node_trace", "alloc", size_arg=3),
    Probe("kmalloc_large", "alloc", "page", size_arg=0),
    Probe("kmalloc_large_node", "alloc", "page", size_arg=0),
    Probe("kmem_cache_alloc", "alloc", "cache", cache_arg=0),
    Probe("kmem_cache_alloc_lru", "alloc", "cache", cache_arg=0),
    Probe("kmem_cache_alloc_node", "alloc", "cache", cache_arg=0),
    # returns how many objects it put in the array p (maple tree nodes come so)
    Probe("kmem_cache_alloc_bulk", "alloc_bulk", "cache", cache_arg=0, ptr_arg=3),
    Probe("__vmalloc_node_range", "alloc", "vmalloc", size_arg=0),
    # A krealloc that moves the object is seen by the kmalloc and kfree inside it;
    # one that keeps the pointer changes only the object's size.
    Probe("krealloc", "realloc", size_arg=1, ptr_arg=0),
    Probe("pcpu_alloc", "alloc", "percpu", size_arg=0),     # returns a per-CPU pointer
    # 6.10 (memory allocation profiling: alloc_hooks() wrappers) renamed the allocators
    # *_noprof; 6.11 renamed kmalloc_trace __kmalloc_cache_noprof. As in 6.12's mm/slub.c.
    # Not __kmalloc_large_node_noprof: __kmalloc_noprof, __kmalloc_node_noprof and
    # __kmalloc_node_track_caller_noprof call it for sizes above 8 KiB (only an inline
    # kmalloc_node() of a constant large size calls it directly: missed).
    Probe("__kmalloc_noprof", "alloc", size_arg=0),
    Probe("__kmalloc_node_noprof", "alloc", size_arg=0),      # (size[, buckets], flags, node)
    Probe("__kmalloc_node_track_caller_noprof", "alloc", size_arg=0),
    Probe("__kmalloc_cache_noprof", "alloc", size_arg=2),     # (cache, flags, size)
    Probe("__kmalloc_cache_node_noprof", "alloc", size_arg=3),   # (cache, flags, node, size)
    Probe("__kmalloc_large_noprof", "alloc", "page", size_arg=0),
    Probe("kmem_cache_alloc_noprof", "alloc", "cache", cache_arg=0),
    Probe("kmem_cache_alloc_lru_noprof", "alloc", "cache", cache_arg=0),
    Probe("kmem_cache_alloc_node_noprof", "alloc", "cache", cache_arg=0),
    Probe("kmem_cache_alloc_bulk_noprof", "alloc_bulk", "cache", cache_arg=0, ptr_arg=3),
    Probe("__vmalloc_node_range_noprof", "alloc", "vmalloc", size_arg=0),
    Probe("krealloc_noprof", "realloc", size_arg=1, ptr_arg=0),  # calls ..._track_caller_noprof
    Probe("pcpu_alloc_noprof", "alloc", "percpu", size_arg=0),
    Probe("kfree", "free", ptr_arg=0),
    Probe("kmem_cache_free", "free", ptr_arg=1),
    Probe("vfree", "free", ptr_arg=0),
    Probe("free_percpu", "free", ptr_arg=0),
    Probe("kmem_cache_free_bulk", "free_bulk", count_arg=1, ptr_arg=2),
    # A module's code is in place and its init is about to run: what unwinds
    # and names its frames must learn about it now.
    Probe("do_init_module", "module"),
)


@dataclass
class Pending:
    """An allocation entered but not yet returned."""

    probe: Probe
    size: int
    comm: str
    pid: int
    cpu: int
    jiffies: int
    time_ns: int
    regs: dict
    stack: bytes | None             # dropped once unwound
    return_site: int
    cache: str | None = None
    flags: int = 0
    backtrace: tuple[int, ...] = ()
    old: int = 0                    # realloc: the object being resized


@dataclass
class Stats:
    stops: int = 0
    allocs: int = 0
    frees: int = 0
    unknown_frees: int = 0
    null_returns: int = 0
    started: float = field(default_factory=time.monotonic)


class Tracer:
    """Breakpoints on the guest kernel's allocator, feeding an object table."""

    def __init__(self, kernel, table, probes=PROBES, unwinder=None, on_module_load=None,
                 entry: str = "auto", init_probes=()):
        """`unwinder(regs, stack) -> return addresses` turns an entry stop's saved
        registers and stack copy into a backtrace (default: the entry PC only);
        `on_module_load()` runs, with the guest stopped, when a module is loaded.
        `entry`: "auto" puts each breakpoint on the function's ftrace NOP when it
        has one, else on its first instruction; "step" always on the first
        instruction (what a kernel without ftrace gets; for measurements).
        `init_probes` are set only while a module's init function runs (from
        do_init_module's entry to its return): their pages are hot, and a
        breakpoint slows every call through its page while it is in."""
        self.on_module_load = on_module_load or (lambda: None)
        self.interrupted = False      # set by Ctrl-C / SIGTERM under `tracing`
        self.kernel = kernel
        self.guest = kernel.guest
        self.rsp = kernel.guest.rsp
        self.arch = kernel.guest.arch
        self.table = table
        self.comms: dict[int, str] = {}      # pid -> comm of every task seen at a stop
        self.resized: dict[int, int] = {}    # grown in place, not in the table: size
        self.stats = Stats()
        # A breakpoint on the ftrace NOP near a function's start is passed by
        # moving the PC past it: the guest resumes with no single-step. A kernel
        # without ftrace has no NOP: the breakpoint goes on the first instruction,
        # which is then single-stepped with the breakpoint in place (QEMU 6.1+:
        # "Singlestep overrides breakpoints"), no z0/Z0 pair.
        self.probes: dict[int, Probe] = {}
        self.init_probes: dict[int, Probe] = {}
        self._nop_length: dict[int, int] = {}             # breakpoint -> NOP under it (0: step)
        for probe in (*probes, *init_probes):
            address = kernel.symbols.get(probe.name)
            if address is None:
                continue
            nop = self.arch.entry_nop(kernel.guest.read(address, 16)) if entry == "auto" else None
            at, length = nop if nop is not None else (0, 0)
            (self.probes if probe in probes else self.init_probes)[address + at] = probe
            self._nop_length[address + at] = length
        # slab allocations are traced here (breakpoints mode), not read from tracks
        self.slab_probes = any(p.kind in ("kmalloc", "cache") and p.role == "alloc"
                               for p in self.probes.values())
        self.stepped = sorted(p.name for a, p in self.probes.items() if not self._nop_length[a])
        self._inits = 0                   # module inits running: init_probes are in while > 0
        if not any(p.role == "alloc" for p in (*self.probes.values(), *self.init_probes.values())):
            raise QemuleakError("none of the kernel's allocation functions is in the symbols",
                                "pass --vmlinux or --system-map for this kernel")
        self.pending: dict[int, Pending] = {}             # by stack pointer at return
        self.in_flight = 0                                # pending when tracing stopped
        self.freed: dict[int, int] = {}                   # freed, not reallocated: size
        self.return_sites: dict[int, int] = {}       # address -> calls waiting there
        self._cpu_of = {t: i for i, t in enumerate(self.guest.cpus())}
        layout = self.guest.register_by_name
        self._regs_in_g = [layout[name] for name in (
            self.arch.pc_reg, self.arch.sp_reg, *self.arch.arg_regs, self.arch.return_reg,
            *[r for r in ("x29", "x30", "rbp", "gs_base", "cs", "cpsr") if r in layout])]
        self._object_size_off = kernel.types.offsetof("struct kmem_cache", "object_size")
        self._cache_name_off = kernel.types.offsetof("struct kmem_cache", "name")
        self._cache_names: dict[int, str] = {}
        self._to_unwind: list[Pending] = []
        self.unwinder = unwinder or (lambda regs, stack: (regs[self.arch.pc_reg],))
        self._comm_off = kernel.types.offsetof("struct task_struct", "comm")
        self._pid_off = kernel.types.offsetof("struct task_struct", "pid")
        self._jiffies = kernel.symbols.get("jiffies")
        self._preempt_count = tasks.preempt_count_reader(kernel)
        self.kind = self.arch.breakpoint_kind
        self.store_user = slub.slab_flag(kernel, "SLAB_STORE_USER")
        self._core_text = (kernel.symbols.get("_stext") or 0, kernel.symbols.get("_etext") or 0)

    # -- breakpoints -------------------------------------------------------
    def start(self) -> None:
        """Insert the entry breakpoints (the guest must be stopped)."""
        for address in self.probes:
            self.rsp.insert_breakpoint(address, self.kind)

    def stop(self) -> None:
        """Remove every breakpoint we set; the guest stays stopped."""
        self.guest.pause()
        self.rsp.remove_all_breakpoints()
        # calls that entered but never returned (a task can sleep inside kmalloc):
        # their objects stay out of the table
        self.in_flight = sum(p.probe.role != "module" for p in self.pending.values())
        self.pending.clear()
        self._inits = 0
        self.return_sites.clear()

    # -- the loop ----------------------------------------------------------
    def run(self, until, poll: float = 0.2) -> None:
        """Trace until `until()` is true or `interrupted` is set (checked at least
        every `poll` seconds). The guest is stopped when this returns."""
        rsp = self.rsp
        while not self.interrupted and not until():
            if not rsp.running:
                self.guest.resume()
                self.unwind_pending()             # while the guest runs
            try:
                stop = rsp.wait_stop(timeout=poll)
            except GuestConnectionError:
                if not rsp.usable:                # the guest or the connection is gone
                    raise
                continue                          # poll timeout: check `until`
            self.handle(stop)
        self.guest.pause()

    def handle(self, stop) -> None:
        """One breakpoint stop."""
        self.stats.stops += 1
        cpu = self._cpu_of.get(stop.thread or "", 0)
        regs = self._registers(stop.thread)
        pc = regs[self.arch.pc_reg]
        probe = self.probes.get(pc) or (self.init_probes.get(pc) if self._inits else None)
        if probe is not None:
            if probe.role in ("alloc", "alloc_bulk", "realloc"):
                self._enter_alloc(probe, cpu, regs, pc)
            elif probe.role == "free":
                self._free(regs[self.arch.arg_regs[probe.ptr_arg]])
            elif probe.role == "free_bulk":
                self._free_bulk(probe, regs)
            elif probe.role == "cache_create":
                self._cache_create(probe, cpu, regs, stop.thread)
            else:
                self._who(cpu, regs)              # the loader's comm, for its objects
                self.unwind_pending()
                self.on_module_load()
                if self.init_probes:
                    self._module_init(probe, cpu, regs)
            if self._nop_length[pc]:
                self._write_pc(stop.thread, pc + self._nop_length[pc])
            else:
                self.rsp.step(stop.thread, timeout=10)
        elif pc in self.return_sites:
            self._return(cpu, regs, pc, stop.thread)

    def _registers(self, thread) -> dict[str, int]:
        raw = self.rsp.read_registers(thread)
        regs = {r.name: int.from_bytes(raw[r.offset:r.offset + r.bitsize // 8], "little")
                for r in self._regs_in_g}
        for name in self.arch.trace_system_regs:
            regs[name] = self.guest.read_register(name, thread)
        return regs

    def _enter_alloc(self, probe: Probe, cpu: int, regs: dict, pc: int) -> None:
        args = self.arch.arg_regs
        cache = None
        if probe.cache_arg is not None:
            s = regs[args[probe.cache_arg]]
            size = self.kernel.read_u32(s + self._object_size_off)
            cache = self._cache_name(s)
        else:
            size = regs[args[probe.size_arg]]
        site, sp_after = self.arch.return_site(regs, self.guest.read_u64)
        comm, pid, flags = self._who(cpu, regs)
        entry = Pending(probe, size, comm, pid, cpu, self._read_jiffies(), time.time_ns(),
                        regs, self._stack_copy(regs[self.arch.sp_reg]), site, cache, flags)
        if probe.ptr_arg is not None:
            entry.old = regs[args[probe.ptr_arg]]
        self.pending[sp_after] = entry
        self._to_unwind.append(entry)
        self._wait_at(site)

    def _wait_at(self, site: int) -> None:
        """One more call returns to `site`: a breakpoint there while any waits."""
        waiting = self.return_sites.get(site, 0)
        if waiting == 0:
            self.rsp.insert_breakpoint(site, self.kind)
        self.return_sites[site] = waiting + 1

    def unwind_pending(self) -> None:
        """Backtraces of the allocations entered so far, from their saved registers
        and stack copies; run while the guest runs, between stops."""
        for entry in self._to_unwind:
            entry.backtrace = tuple(self.unwinder(entry.regs, entry.stack))
            entry.stack = None
        self._to_unwind.clear()

    def _cache_name(self, cache: int) -> str:
        name = self._cache_names.get(cache)
        if name is None:
            name = self.guest.read_string(self.guest.read_u64(cache + self._cache_name_off), 64)
            self._cache_names[cache] = name
        return name

    def _stack_copy(self, sp: int) -> bytes:
        """Up to STACK_COPY bytes from sp, stopping at the stack's unmapped end."""
        parts, at = [], sp
        while at < sp + STACK_COPY:
            n = min(4096 - (at & 4095), sp + STACK_COPY - at)
            try:
                parts.append(self.guest.read(at, n))
            except QemuleakError:
                break
            at += n
        return b"".join(parts)

    def _write_pc(self, thread, pc: int) -> None:
        self.guest.write_register(self.arch.pc_reg, pc, thread)

    def _return(self, cpu: int, regs: dict, pc: int, thread) -> None:
        sp = regs[self.arch.sp_reg]
        entry = self.pending.pop(sp, None)
        left = self.return_sites[pc] - (entry is not None)
        if left:
            # Other calls still wait here: step this vCPU past the breakpoint,
            # which stays in place.
            self.return_sites[pc] = left
            self.rsp.step(thread, timeout=10)
        else:
            del self.return_sites[pc]
            self.rsp.remove_breakpoint(pc, self.kind)
        if entry is None:
            return                                 # a call we did not see enter
        if entry.probe.role == "module":           # the module's init is done
            self._inits -= 1
            if not self._inits:
                for address in self.init_probes:
                    self.rsp.remove_breakpoint(address, self.kind)
            return
        address = regs[self.arch.return_reg]
        if entry.probe.role == "realloc":
            if address == entry.old and entry.size and \
                    self.table.move(address, address, entry.size) is None:
                self.resized[address] = entry.size     # for provenance.TrackSync
            # A moved object is seen by the kmalloc inside krealloc, unless the
            # compiler inlined it (a tiny 6.1 kernel: __kmalloc_node_track_caller into
            # krealloc): then the new object is krealloc's own. Not in tracks mode,
            # where slab objects come from SLUB's tracks.
            if address == entry.old or not self.slab_probes or \
                    address in (0, ZERO_SIZE_PTR) or self.table.get(address) is not None:
                return
        addresses = [address]
        if entry.probe.role == "alloc_bulk":       # the result is a count
            addresses = [] if not 0 < address <= 1 << 16 else \
                np.frombuffer(self.guest.read(entry.old, 8 * address), "<u8").tolist()
        if not addresses or addresses[0] in (0, ZERO_SIZE_PTR) or entry.size == 0:
            self.stats.null_returns += 1
            return
        if entry.stack is not None:
            self.unwind_pending()
        for address in addresses:
            self.stats.allocs += 1
            self.freed.pop(address, None)
            self.table.add(address, entry.size, KINDS[entry.probe.kind], cache=entry.cache,
                           comm=entry.comm, pid=entry.pid, cpu=entry.cpu, jiffies=entry.jiffies,
                           timestamp_ns=entry.time_ns, backtrace=entry.backtrace,
                           flags=entry.flags)

    def _free(self, address: int) -> None:
        if address in (0, ZERO_SIZE_PTR):
            return
        self.stats.frees += 1
        record = self.table.remove(address)
        if record is None:
            self.stats.unknown_frees += 1
        # Freed memory keeps stale pointers that would hide leaks if it were
        # scanned: remember it until it is allocated again (size 0: unknown).
        if len(self.freed) < FREED_LIMIT:
            self.freed[address] = record.size if record is not None else 0

    def _free_bulk(self, probe: Probe, regs: dict) -> None:
        args = self.arch.arg_regs
        count = regs[args[probe.count_arg]]
        if count <= 0 or count > 1 << 16:
            return
        pointers = np.frombuffer(self.guest.read(regs[args[probe.ptr_arg]], 8 * count), "<u8")
        for address in pointers.tolist():
            self._free(address)

    # -- who and when --------------------------------------------------------
    def _who(self, cpu: int, regs: dict) -> tuple[str, int, int]:
        """kmemleak's comm and pid: the task, or hardirq/softirq with pid 0."""
        current: list[int] = []          # found once: arm64's count is read through it too

        def current_task() -> int:
            if not current:
                current.append(tasks.current_task(self.kernel, cpu, regs))
            return current[0]
        count = self._preempt_count(self.arch.percpu_base(regs) or 0, current_task)
        if count & HARDIRQ_MASK:
            return "hardirq", 0, Flags.HARDIRQ
        if count & SOFTIRQ_OFFSET:
            return "softirq", 0, Flags.SOFTIRQ
        task = current_task()
        raw = self.guest.read(task + self._comm_off, 16)
        pid = int.from_bytes(self.guest.read(task + self._pid_off, 4), "little", signed=True)
        comm = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.comms[pid] = comm
        return comm, pid, 0

    def _module_init(self, probe: Probe, cpu: int, regs: dict) -> None:
        """do_init_module entered: the init probes go in until it returns."""
        if not self._inits:
            for address in self.init_probes:
                self.rsp.insert_breakpoint(address, self.kind)
        self._inits += 1
        site, sp_after = self.arch.return_site(regs, self.guest.read_u64)
        self.pending[sp_after] = Pending(probe, 0, "", 0, cpu, 0, 0, regs, None, site)
        self._wait_at(site)

    def _cache_create(self, probe: Probe, cpu: int, regs: dict, thread) -> None:
        """A module creates a slab cache: make it keep allocation tracks, as
        slub_debug=U would (SLUB then never merges it with another cache). Only
        done when the kernel's own caches keep them (tracks mode)."""
        site, _ = self.arch.return_site(regs, self.guest.read_u64)
        if self._core_text[0] <= site < self._core_text[1]:
            return
        reg = self.arch.arg_regs[probe.flags_arg]
        flags = regs[reg]
        if not flags & self.store_user:
            self.guest.write_register(reg, flags | self.store_user, thread)

    def _read_jiffies(self) -> int:
        return self.guest.read_u64(self._jiffies) if self._jiffies is not None else 0


@contextmanager
def tracing(tracer: Tracer):
    """Insert the breakpoints for the block; on any exit (normal, exception,
    Ctrl-C, SIGTERM) remove them all and leave the guest as it was found.

    Ctrl-C and SIGTERM only set `tracer.interrupted`: `run` returns at its next
    check, between two packets, so the connection is never cut mid-exchange. A
    second one raises KeyboardInterrupt at once."""
    def on_signal(signum, frame):
        if tracer.interrupted:
            raise KeyboardInterrupt
        tracer.interrupted = True
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    tracer.start()
    try:
        yield tracer
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        try:
            tracer.stop()
        except QemuleakError:
            pass
