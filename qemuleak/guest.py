"""A live guest seen through QEMU's gdbstub: vCPU registers, physical and virtual
memory, paused or running.

`Guest.connect(target)` stops the guest (QEMU does so when a debugger connects);
`close()` resumes it if it was running when we came, so the guest is left as found.
"""

import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .arch import Arch, arch_of_target_xml
from .errors import GuestConnectionError, GuestMemoryError, QemuleakError
from .memory import (GdbstubMem, PhysMemory, ProcMem, RamRange, SharedRam, hva_of_block,
                     parse_mtree, qemu_pid_of)
from .pagetable import PageTables
from .rsp import Register, RSPClient

BACKENDS = ("auto", "shared-ram", "proc-mem", "gdbstub")
_BIG_READ = 1 << 16          # bytes: longer reads walk the page tables once


class Guest:
    """Registers and memory of one QEMU guest."""

    def __init__(self, rsp: RSPClient, arch: Arch, layout: list[Register],
                 ram_block: str, ranges: list[RamRange], was_running: bool):
        self.rsp = rsp
        self.arch = arch
        self.layout = layout
        self.register_by_name = {r.name: r for r in layout}
        self.ram_block = ram_block
        self.ranges = ranges
        self.was_running = was_running
        self.mem: PhysMemory | None = None
        self.backend_note = ""          # why the memory backend is the one it is
        self._regs: dict[int, dict[str, int]] = {}
        self._tables: PageTables | None = None

    # -- connecting ---------------------------------------------------------
    @classmethod
    def connect(cls, target: str, *, backend: str = "auto", ram_path: str | Path | None = None,
                timeout: float = 5.0) -> "Guest":
        """Attach to the gdbstub at `target` and open guest memory.

        backend: "auto" picks shared-ram (when `ram_path`, e.g. the memfd of a VM we
        launched, is given), then proc-mem (a local QEMU we may read), then gdbstub.
        """
        if backend not in BACKENDS:
            raise QemuleakError(f"unknown memory backend {backend!r}", f"use one of {BACKENDS}")
        rsp = RSPClient.connect(target, timeout=timeout)
        try:
            xml = rsp.target_xml().get("target.xml", "")
            m = re.search(r"<architecture>\s*([^<\s]+)\s*</architecture>", xml)
            arch = arch_of_target_xml(m.group(1) if m else "unknown")
            block, ranges = parse_mtree(rsp.monitor("info mtree -f"))
            guest = cls(rsp, arch, rsp.register_layout(), block, ranges, rsp.stopped_on_connect)
            guest.mem, guest.backend_note = guest._open_memory(target, backend, ram_path)
            return guest
        except BaseException:
            rsp.close()
            raise

    def _open_memory(self, target: str, backend: str,
                     ram_path: str | Path | None) -> tuple[PhysMemory, str]:
        tried = []
        if backend in ("auto", "shared-ram") and ram_path is not None:
            try:
                return SharedRam(ram_path, self.ranges), f"mapped {ram_path}"
            except QemuleakError as e:
                if backend != "auto":
                    raise
                tried.append(e.message)
        elif backend == "shared-ram":
            raise QemuleakError("the shared-ram backend needs the guest's RAM file",
                                "let qemuleak launch QEMU, or use --backend proc-mem")
        if backend in ("auto", "proc-mem"):
            pid = qemu_pid_of(target)
            try:
                if pid is None:
                    raise GuestMemoryError(f"no local QEMU process listens at {target}")
                hva = hva_of_block(self.rsp, self.ranges)
                return ProcMem(pid, hva, self.ranges), f"/proc/{pid}/mem"
            except QemuleakError as e:
                if backend != "auto":
                    raise
                tried.append(e.message)
        note = "physical-mode m packets" + (f" ({'; '.join(tried)})" if tried else "")
        return GdbstubMem(self.rsp, self.ranges), note

    def close(self, resume: bool | None = None) -> None:
        """Resume the guest if it was running when we attached (or if `resume`), then
        disconnect. Breakpoints we set are removed first."""
        if self.rsp is None:
            return
        try:
            if (resume if resume is not None else self.was_running) and self.rsp.usable:
                if not self.rsp.running:
                    self.rsp.remove_all_breakpoints()
                    self._resume_for_good()
        finally:
            if self.mem is not None:
                self.mem.close()
            self.rsp.close()
            self.rsp = None

    def _resume_for_good(self, settle: float = 0.5, tries: int = 64) -> None:
        """Continue until the guest stays running for `settle` seconds.

        A stop now is not ours (we hold no breakpoint): a vCPU that hit one of our
        breakpoints as another stopped the guest reports it when resumed, and a
        debugger that was killed leaves its breakpoints in QEMU (QEMU 7.2 keeps
        them across connections). Either way the breakpoint under the stopped PC,
        if any, is removed and the guest continued: leaving it stopped would leave
        it with no debugger to resume it."""
        for _ in range(tries):
            self.rsp.cont()
            try:
                stop = self.rsp.wait_stop(timeout=settle)
            except GuestConnectionError:
                if not self.rsp.usable:
                    raise
                return                  # still running after `settle`: done
            if stop.thread:
                pc = self.read_register(self.arch.pc_reg, stop.thread)
                self.rsp.remove_stray_breakpoint(pc, self.arch.breakpoint_kind)
        self.rsp.cont()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.close()
        except QemuleakError:
            if kind is None:        # never hide the error that is already on its way
                raise

    # -- running and stopping -------------------------------------------------
    @property
    def running(self) -> bool:
        return self.rsp.running

    def resume(self) -> None:
        """Let the guest run; cached registers and page-table pages are dropped."""
        self._regs.clear()
        if self._tables is not None:
            self._tables.invalidate()
        self.rsp.cont()

    def pause(self, timeout: float = 10.0) -> None:
        if self.rsp.running:
            self.rsp.interrupt()
            self.rsp.wait_stop(timeout)

    @contextmanager
    def paused(self):
        """Stop the guest for the block; resume it after if it was running."""
        was_running = self.rsp.running
        self.pause()
        try:
            yield self
        finally:
            if was_running:
                self.resume()

    # -- vCPUs ----------------------------------------------------------------
    def cpus(self) -> list[str]:
        """gdbstub thread ids, one per vCPU, in CPU order."""
        return self.rsp.threads()

    def registers(self, cpu: int = 0) -> dict[str, int]:
        """Integer registers of vCPU `cpu` (guest must be stopped), by name."""
        regs = self._regs.get(cpu)
        if regs is None:
            thread = self.cpus()[cpu]
            raw = self.rsp.read_registers(thread)
            regs = {}
            for r in self.layout:
                end = r.offset + (r.bitsize + 7) // 8
                if r.bitsize <= 64 and end <= len(raw) and r.name not in self.arch.system_regs:
                    regs[r.name] = int.from_bytes(raw[r.offset:end], "little")
            for name in self.arch.system_regs:
                if name in self.register_by_name:
                    regs[name] = self.read_register(name, thread)
            self._regs[cpu] = regs
        return regs

    def read_register(self, name: str, thread: str) -> int:
        """One register of a vCPU by name, with a `p` packet."""
        reg = self.register_by_name[name]
        return int.from_bytes(self.rsp.read_register(reg.regnum, thread), "little")

    def write_register(self, name: str, value: int, thread: str) -> None:
        reg = self.register_by_name[name]
        self.rsp.write_register(reg.regnum, value.to_bytes((reg.bitsize + 7) // 8, "little"), thread)

    # -- memory ---------------------------------------------------------------
    def page_tables(self) -> PageTables:
        """The kernel's page tables (cached while the guest stays stopped)."""
        if self._tables is None:
            # Each vCPU's register names a root. One caught on a kernel entry
            # trampoline names tables that map almost nothing: then the arch's
            # fallbacks (where the real tables sit next to it) are tried too.
            fmt, roots = None, []
            for cpu in range(len(self.cpus())):
                regs = self.registers(cpu)
                fmt = self.arch.paging_format(regs)
                roots += [r for r in self.arch.kernel_root_candidates(regs) if r not in roots]
            best = self._fullest(roots, fmt)
            if best is None or len(best.kernel_top_entries()) <= 2:
                fallbacks = [f for r in roots for f in self.arch.kernel_root_fallbacks(r)]
                best = self._fullest([*(roots if best is None else [best.root]), *fallbacks], fmt)
            if best is None:
                raise GuestMemoryError("found no kernel page tables on any vCPU")
            self._tables = best
        return self._tables

    def pin_kernel_root(self, va: int) -> None:
        """Walk from the kernel's own top-level table (swapper_pg_dir, init_top_pgt)
        from now on: a vCPU's register may name a process's tables, which die with
        the process."""
        tables = self.page_tables()
        self._tables = PageTables(self.read_phys, tables.translate(va), tables.fmt)

    def _fullest(self, roots: list[int], fmt) -> PageTables | None:
        best, most = None, -1
        for root in roots:
            try:
                tables = PageTables(self.read_phys, root, fmt)
                n = len(tables.kernel_top_entries())
            except QemuleakError:
                continue
            if n > most:
                best, most = tables, n
        return best

    def read_phys(self, gpa: int, size: int) -> bytes:
        return self.mem.read(gpa, size)

    def read(self, va: int, size: int) -> bytes:
        """`size` bytes of kernel virtual memory at `va`, through the kernel's page
        tables; GuestMemoryError if any page is not mapped."""
        tables = self._tables if self._tables is not None else self.page_tables()
        if 0 < size <= 4096 - (va & 4095):     # most reads: one page
            return self.mem.read(tables.translate(va), size)
        if size > _BIG_READ:                 # e.g. the struct page array: by mapping
            return self._read_mapped(va, size)
        parts = []
        while size > 0:
            n = min(size, 4096 - (va & 4095))
            parts.append(self.mem.read(tables.translate(va), n))
            va += n
            size -= n
        return b"".join(parts)

    def _read_mapped(self, va: int, size: int) -> bytes:
        """Like `read`, one piece per mapping rather than per page."""
        parts, at = [], va
        for m in self.page_tables().mappings(va, va + size):
            if m.va != at:
                break
            parts.append(self.mem.read(m.pa, m.size))
            at += m.size
        if at != va + size:
            raise GuestMemoryError(f"virtual address {at:#x} is not mapped")
        return b"".join(parts)

    def array(self, va: int, size: int) -> np.ndarray:
        """`size` bytes at `va` as uint8: a view of the memory when it is one mapped
        piece of a RAM copy (no copy of, say, 32 MiB of struct pages), else read."""
        view = getattr(self.mem, "view", None)
        if view is not None:
            pieces = self.page_tables().mappings(va, va + size)
            if len(pieces) == 1 and pieces[0].va == va and pieces[0].size == size:
                out = view(pieces[0].pa, size)
                if out is not None:
                    return out
        return np.frombuffer(self.read(va, size), np.uint8)

    def ram_mappings(self, start: int, end: int):
        """The mapped pieces of [start, end) that are RAM (not device memory)."""
        return [m for m in self.page_tables().mappings(start, end) if self.mem.is_ram(m.pa, m.size)]

    def read_u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def read_string(self, va: int, limit: int = 256) -> str:
        data = self.read(va, limit)
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def ram_size(self) -> int:
        return sum(r.size for r in self.ranges)


def measure_read(mem: PhysMemory, total: int, chunk: int = 1 << 20) -> float:
    """Bytes per second reading `total` bytes of RAM from the start, `chunk` at a time."""
    start = time.perf_counter()
    done = 0
    for r in mem.ranges:
        pos = r.gpa
        while pos < r.end and done < total:
            n = min(chunk, r.end - pos, total - done)
            mem.read(pos, n)
            pos += n
            done += n
    return done / (time.perf_counter() - start)
