"""Backtraces from saved stack snapshots, computed after the guest has moved on.

At an allocation breakpoint the tracer keeps only the vCPU's registers and a copy
of the top of its kernel stack, and lets the guest run at once. The backtrace
(like kmemleak's: up to 16 return addresses) is worked out later, only for the
objects that are reported, so an unwinder reads nothing but that snapshot and
what does not change while the kernel runs: kernel and module text ranges and
unwind tables, loaded up front (`unwinder_for(kernel)`, `refresh_modules`).

    unwinder = unwinder_for(kernel)            # guest stopped: reads tables once
    pcs = unwinder.unwind(regs, regs[sp], stack_copy)

`unwind` returns PCs: the stop PC first (the allocator's entry), then return
addresses, outermost last. It stops, without raising, when the snapshot ends, an
address is not kernel or module text, the unwind data says "end of stack" (or
nothing usable), the stack would go the wrong way, or `max_frames` are found.

- x86_64 (CONFIG_UNWINDER_ORC): the kernel's ORC tables, vmlinux's from the
  vmlinux ELF (else from guest memory), each module's from its `struct module`.
  The state machine is the kernel's (arch/x86/kernel/unwind_orc.c). Interrupt
  and exception frames (ORC "regs" and "iret regs" entries) are followed through
  the pt_regs when those are in the snapshot; a frame that returns to user mode
  ends the trace after the entry code (entry_SYSCALL_64_after_hwframe, like
  kmemleak's traces), as does a pt_regs beyond the end of the snapshot.
- arm64: the frame-record chain (x29: [fp] = caller's fp, [fp + 8] = return
  address), pointer-authentication bits stripped from every return address.

Both take `at_entry`: True (the default) when the registers were caught at a
function's first instruction, as at an allocation breakpoint: the PC is exact,
the return address is still in the link register on arm64 and x29 still names
the caller's frame. False for a blocked task's saved context (x86: the inactive
task frame; arm64: thread.cpu_context), where the PC is a return address and, on
arm64, x29 is the frame record of the function holding it.
"""

from __future__ import annotations

import bisect
import struct
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QemuleakError, SymbolError

MAX_FRAMES = 16

_U64 = struct.Struct("<Q")
_FRAME_RECORD = struct.Struct("<QQ")
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# Text ranges: which addresses are code we may unwind through


class _Spans:
    """Sorted, non-overlapping [start, end) ranges, each with a payload."""

    def __init__(self, spans: list[tuple[int, int, object]]):
        spans = sorted((s for s in spans if s[1] > s[0]), key=lambda s: (s[0], s[1]))
        self.starts = [s for s, _, _ in spans]
        self.ends = [e for _, e, _ in spans]
        self.payloads = [p for _, _, p in spans]

    def find(self, address: int):
        """The payload of the range holding `address`, or None."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.ends[i]:
            return self.payloads[i]
        return None


@dataclass(frozen=True)
class ModuleText:
    """Where one module's code lives (core text, and init text while loading)."""

    name: str
    ranges: tuple[tuple[int, int], ...]       # (start, end)


def kernel_text_ranges(symbols) -> list[tuple[int, int]]:
    """[_stext, _etext) and [_sinittext, _einittext) of the kernel image."""
    out = []
    for lo, hi in (("_stext", "_etext"), ("_sinittext", "_einittext")):
        start, end = symbols.get(lo), symbols.get(hi)
        if start is not None and end is not None and end > start:
            out.append((start, end))
    if not out:
        raise SymbolError("cannot tell where the kernel's code is: no _stext/_etext symbols",
                          "pass --vmlinux or --system-map")
    return out


def module_text(kernel, module) -> ModuleText:
    """The text ranges of a loaded module (`qemuleak.kernel.modules.Module`): its
    core text, and its init text while the module is still initialising."""
    t = kernel.types
    ranges = []
    if t.has_member("struct module", "mem"):
        # 6.4+: mem[] indexed by enum mod_mem_type; MOD_TEXT is 0, MOD_INIT_TEXT 4.
        base = t.offsetof("struct module", "mem")
        size = t.sizeof("struct module_memory")
        b_off = t.offsetof("struct module_memory", "base")
        s_off = t.offsetof("struct module_memory", "size")
        for index in (0, 4):
            m = module.address + base + index * size
            start, length = kernel.read_u64(m + b_off), kernel.read_u32(m + s_off)
            if start and length:
                ranges.append((start, start + length))
    else:
        b_off = t.offsetof("struct module_layout", "base")
        ts_off = t.offsetof("struct module_layout", "text_size")
        for layout in ("core_layout", "init_layout"):
            if not t.has_member("struct module", layout):
                continue
            at = module.address + t.offsetof("struct module", layout)
            start, length = kernel.read_u64(at + b_off), kernel.read_u32(at + ts_off)
            if start and length:
                ranges.append((start, start + length))
    return ModuleText(module.name, tuple(ranges))


# ---------------------------------------------------------------------------
# The interface


class Unwinder(ABC):
    """Turns (registers, stack snapshot) into a list of PCs.

    `kernel_text`: [start, end) ranges of the kernel image's code; modules come
    from `refresh_modules` (or `set_modules`). Code outside these is not unwound
    through and ends a trace."""

    pc_reg: str
    sp_reg: str

    def __init__(self, kernel_text: list[tuple[int, int]], kernel_payload=True):
        self._kernel = [(s, e, kernel_payload) for s, e in kernel_text]
        self._modules: list[tuple[int, int, object, str]] = []   # start, end, payload, name
        self._spans = _Spans(self._kernel)

    @abstractmethod
    def unwind(self, regs: dict[str, int], stack_base: int, stack: bytes,
               max_frames: int = MAX_FRAMES, *, at_entry: bool = True) -> list[int]:
        """PCs from `regs` and `stack` (a copy of memory from `stack_base` on): the
        stop PC, then return addresses, outermost last; at most `max_frames`."""

    def covers(self, pc: int) -> bool:
        """Is `pc` in kernel or (known) module text?"""
        return self._spans.find(pc) is not None

    # -- modules ---------------------------------------------------------------
    def refresh_modules(self, kernel) -> None:
        """Read the guest's module list again (the guest must be stopped); call it
        when modules come and go. Text that is gone (an unloaded module, init
        text freed after a module's init) keeps its entry, so that traces saved
        while it was there still unwind, until new module text overlaps it."""
        from .kernel import modules
        texts = []
        for module in modules.for_each_module(kernel):
            text = module_text(kernel, module)
            if text.ranges:
                texts.append((text, self._module_payload(kernel, module, text)))
        self.set_modules(texts)

    def set_modules(self, texts: list[tuple[ModuleText, object]]) -> None:
        """Module text ranges (and each one's unwind data) to add; see
        `refresh_modules`."""
        fresh = [(s, e, payload, text.name) for text, payload in texts if payload is not None
                 for s, e in text.ranges]
        kept = [m for m in self._modules
                if not any(m[0] < e and s < m[1] for s, e, _, _ in fresh)]
        self._modules = fresh + kept
        self._spans = _Spans(self._kernel + [(s, e, p) for s, e, p, _ in self._modules])

    def _module_payload(self, kernel, module, text: ModuleText):
        """What the unwinder needs for this module's code (None: skip it)."""
        return True

    @property
    def module_names(self) -> list[str]:
        return sorted({name for _, _, _, name in self._modules})


# ---------------------------------------------------------------------------
# x86_64: ORC

# Base registers (arch/x86/include/asm/orc_types.h; the same numbers since 4.14).
ORC_REG_UNDEFINED, ORC_REG_PREV_SP, ORC_REG_DX, ORC_REG_DI = 0, 1, 2, 3
ORC_REG_BP, ORC_REG_SP, ORC_REG_R10, ORC_REG_R13 = 4, 5, 6, 7
ORC_REG_BP_INDIRECT, ORC_REG_SP_INDIRECT = 8, 9

# Our own entry kinds; the numbers are those of 6.4+'s ORC_TYPE_*.
KIND_UNDEFINED, KIND_END, KIND_CALL, KIND_REGS, KIND_REGS_PARTIAL, KIND_BAD = range(6)

# Registers some entry code bases the previous SP on (only known from pt_regs or
# the first frame's registers).
_REG_BASES = {ORC_REG_DX: "rdx", ORC_REG_DI: "rdi", ORC_REG_R10: "r10", ORC_REG_R13: "r13"}
_PT_REGS_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                  "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
_PT_REGS_FIELDS = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax",
                   "cx", "dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss")

LOOKUP_BLOCK_SIZE = 256           # the kernel's orc_lookup: one slot per 256 bytes of text


@dataclass(frozen=True)
class OrcLayout:
    """How the 16-bit word after sp_offset and bp_offset of `struct orc_entry` is
    cut, as (shift, width) pairs, and which type numbering the kernel uses.

    Up to 6.3: `sp_reg:4 bp_reg:4 type:2 end:1`, types CALL 0, REGS 1,
    REGS_PARTIAL 2, the end of the stack an UNDEFINED sp_reg with end set.
    6.4+: `sp_reg:4 bp_reg:4 type:3 signal:1`, types UNDEFINED 0, END_OF_STACK 1,
    CALL 2, REGS 3, REGS_PARTIAL 4."""

    sp_reg: tuple[int, int] = (0, 4)
    bp_reg: tuple[int, int] = (4, 4)
    type: tuple[int, int] = (8, 2)
    end: tuple[int, int] | None = (10, 1)
    signal: tuple[int, int] | None = None
    entry_size: int = 6

    @classmethod
    def from_types(cls, types) -> "OrcLayout":
        """The layout the kernel's own type information describes (6.1's when the
        kernel does not describe `struct orc_entry`)."""
        name = "struct orc_entry"
        if not types.has_type(name):
            return cls()

        def bits(member):
            if not types.has_member(name, member):
                return None
            offset, width = types.member_bits(name, member)
            return offset - 32, width            # the word after two s16s
        return cls(sp_reg=bits("sp_reg"), bp_reg=bits("bp_reg"), type=bits("type"),
                   end=bits("end"), signal=bits("signal"), entry_size=types.sizeof(name))

    def decode(self, orc: bytes) -> tuple[np.ndarray, ...]:
        """(sp_offset, bp_offset, sp_reg, bp_reg, kind, signal) arrays of the entries."""
        n = len(orc) // self.entry_size
        raw = np.frombuffer(orc, np.uint8, n * self.entry_size).reshape(n, self.entry_size)
        sp_off = raw[:, 0:2].copy().view("<i2").reshape(n)
        bp_off = raw[:, 2:4].copy().view("<i2").reshape(n)
        word = raw[:, 4:6].copy().view("<u2").reshape(n).astype(np.int64)

        def field(where):
            if where is None:
                return np.zeros(n, np.int64)
            shift, width = where
            return (word >> shift) & ((1 << width) - 1)
        sp_reg, bp_reg, typ = field(self.sp_reg), field(self.bp_reg), field(self.type)
        if self.signal is not None:                  # 6.4+: the type says it all
            kind = np.where(typ <= KIND_REGS_PARTIAL, typ, KIND_BAD)
            kind = np.where((sp_reg == ORC_REG_UNDEFINED) & (kind != KIND_END),
                            KIND_UNDEFINED, kind)
            signal = field(self.signal)
        else:
            end = field(self.end)
            kind = np.where(typ <= 2, typ + KIND_CALL, KIND_BAD)
            kind = np.where(sp_reg == ORC_REG_UNDEFINED,
                            np.where(end != 0, KIND_END, KIND_UNDEFINED), kind)
            signal = (kind == KIND_REGS) | (kind == KIND_REGS_PARTIAL)
        return sp_off, bp_off, sp_reg, bp_reg, kind, signal


@dataclass(frozen=True)
class PtRegsLayout:
    """Byte offsets in x86_64 `struct pt_regs` (arch/x86/include/asm/ptrace.h)."""

    offsets: tuple[int, ...] = tuple(8 * i for i in range(21))    # _PT_REGS_FIELDS order
    size: int = 168

    @classmethod
    def from_types(cls, types) -> "PtRegsLayout":
        if not types.has_type("struct pt_regs"):
            return cls()
        return cls(tuple(types.offsetof("struct pt_regs", f) for f in _PT_REGS_FIELDS),
                   types.sizeof("struct pt_regs"))

    def field(self, name: str) -> int:
        return self.offsets[_PT_REGS_FIELDS.index(name)]


class OrcTable:
    """One sorted ORC table (the kernel image's, or one module's).

    `ips`: absolute code addresses (sorted, runtime), the entries as parallel
    arrays. With `lookup_start`, `lookup` is the kernel's orc_lookup fast table:
    for each LOOKUP_BLOCK_SIZE block of text from `lookup_start`, the index of the
    entry that covers the block's first byte; a lookup then searches only between
    two of its slots."""

    def __init__(self, ips: np.ndarray, orc: bytes, layout: OrcLayout = OrcLayout(),
                 lookup_range: tuple[int, int] | None = None):
        ips = np.asarray(ips, np.uint64)
        if len(orc) < len(ips) * layout.entry_size:
            raise QemuleakError(f"ORC table has {len(ips)} addresses but only "
                                f"{len(orc) // layout.entry_size} entries")
        sp_off, bp_off, sp_reg, bp_reg, kind, signal = layout.decode(orc[:len(ips) * layout.entry_size])
        if len(ips) > 1 and (ips[1:] < ips[:-1]).any():
            # The kernel sorts at build (sorttable) or load time; sort like
            # orc_sort_cmp if not: at one address, the weak section terminators
            # (UNDEFINED, not end) first, so real entries win the lookup.
            weak = kind == KIND_UNDEFINED
            order = np.lexsort((~weak, ips))
            ips, sp_off, bp_off = ips[order], sp_off[order], bp_off[order]
            sp_reg, bp_reg, kind, signal = sp_reg[order], bp_reg[order], kind[order], signal[order]
        self.ips = array("Q", ips.tobytes())
        self.sp_off = array("h", sp_off.astype("<i2").tobytes())
        self.bp_off = array("h", bp_off.astype("<i2").tobytes())
        self.sp_reg = array("B", sp_reg.astype(np.uint8).tobytes())
        self.bp_reg = array("B", bp_reg.astype(np.uint8).tobytes())
        self.kind = array("B", kind.astype(np.uint8).tobytes())
        self.signal = array("B", signal.astype(np.uint8).tobytes())
        self.lookup_start = self.lookup_end = 0
        self.lookup = array("I")
        if lookup_range is not None and len(ips):
            start, end = lookup_range
            blocks = start + LOOKUP_BLOCK_SIZE * np.arange(
                (end - start + LOOKUP_BLOCK_SIZE - 1) // LOOKUP_BLOCK_SIZE + 1, dtype=np.uint64)
            slots = np.searchsorted(ips, blocks, side="right").astype(np.int64) - 1
            self.lookup = array("I", np.maximum(slots, 0).astype(np.uint32).tobytes())
            self.lookup_start, self.lookup_end = start, end

    @classmethod
    def from_relative(cls, ip_table_address: int, ip_table: bytes, orc: bytes,
                      layout: OrcLayout = OrcLayout(),
                      lookup_range: tuple[int, int] | None = None) -> "OrcTable":
        """From `.orc_unwind_ip` as the kernel keeps it (int32s, each relative to
        its own address, the table at `ip_table_address`) and `.orc_unwind`."""
        rel = np.frombuffer(ip_table, "<i4", len(ip_table) // 4).astype(np.int64)
        here = np.int64(ip_table_address - (1 << 64) if ip_table_address >= 1 << 63
                        else ip_table_address)
        ips = (here + 4 * np.arange(len(rel), dtype=np.int64) + rel).astype(np.uint64)
        return cls(ips, orc, layout, lookup_range)

    def __len__(self) -> int:
        return len(self.ips)

    def find(self, ip: int) -> int:
        """Index of the entry for `ip` (the last one at or below it), or -1."""
        lo, hi = 0, len(self.ips)
        if self.lookup_start <= ip < self.lookup_end:
            slot = (ip - self.lookup_start) // LOOKUP_BLOCK_SIZE
            lo, hi = self.lookup[slot], self.lookup[slot + 1] + 1
        return bisect.bisect_right(self.ips, ip, lo, hi) - 1


def _orc_from_vmlinux(path: Path, slide: int, layout: OrcLayout,
                      text: tuple[int, int] | None) -> OrcTable | None:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sections = {}
        for name in (".orc_unwind_ip", ".orc_unwind"):
            s = elf.get_section_by_name(name)
            if s is None:
                return None
            f.seek(s["sh_offset"])
            sections[name] = (s["sh_addr"], f.read(s["sh_size"]))
    address, ips = sections[".orc_unwind_ip"]
    return OrcTable.from_relative((address + slide) & _MASK64, ips, sections[".orc_unwind"][1],
                                  layout, text)


def _orc_from_memory(kernel, layout: OrcLayout, text: tuple[int, int] | None) -> OrcTable | None:
    names = ("__start_orc_unwind_ip", "__stop_orc_unwind_ip", "__start_orc_unwind")
    start, stop, orc = (kernel.symbols.get(n) for n in names)
    if start is None or stop is None or orc is None or stop <= start:
        return None
    n = (stop - start) // 4
    return OrcTable.from_relative(start, kernel.read(start, 4 * n),
                                  kernel.read(orc, n * layout.entry_size), layout, text)


class OrcUnwinder(Unwinder):
    """x86_64 kernels built with CONFIG_UNWINDER_ORC."""

    pc_reg, sp_reg, bp_reg = "rip", "rsp", "rbp"

    def __init__(self, kernel_table: OrcTable, kernel_text: list[tuple[int, int]],
                 pt_regs: PtRegsLayout = PtRegsLayout(), layout: OrcLayout = OrcLayout()):
        super().__init__(kernel_text, kernel_table)
        self.kernel_table = kernel_table
        self.pt_regs = pt_regs
        self.layout = layout
        self._ip_off = pt_regs.field("ip")
        self._sp_off = pt_regs.field("sp")
        self._cs_off = pt_regs.field("cs")
        self._iret_size = pt_regs.size - self._ip_off         # ip, cs, flags, sp, ss

    @classmethod
    def from_kernel(cls, kernel) -> "OrcUnwinder":
        """The kernel's ORC tables (vmlinux ELF, else guest memory) and those of
        its loaded modules (guest memory); the guest must be stopped."""
        types = kernel.types
        layout = OrcLayout.from_types(types)
        text = kernel_text_ranges(kernel.symbols)
        stext, etext = kernel.symbols.get("_stext"), kernel.symbols.get("_etext")
        fast = (stext, etext) if stext is not None and etext is not None else None
        table = None
        if kernel.vmlinux is not None:
            table = _orc_from_vmlinux(kernel.vmlinux, kernel.slide, layout, fast)
        if table is None:
            table = _orc_from_memory(kernel, layout, fast)
        if table is None or not len(table):
            raise QemuleakError("the kernel has no ORC unwind tables",
                                "qemuleak unwinds x86_64 kernels built with CONFIG_UNWINDER_ORC "
                                "(pass --vmlinux, or a System.map with __start_orc_unwind_ip)")
        unwinder = cls(table, text, PtRegsLayout.from_types(types), layout)
        unwinder.refresh_modules(kernel)
        return unwinder

    def _module_payload(self, kernel, module, text: ModuleText):
        t = kernel.types
        if not t.has_member("struct module", "arch.orc_unwind_ip"):
            return None
        base = module.address
        n = kernel.read_u32(base + t.offsetof("struct module", "arch.num_orcs"))
        ip_table = kernel.read_u64(base + t.offsetof("struct module", "arch.orc_unwind_ip"))
        orc = kernel.read_u64(base + t.offsetof("struct module", "arch.orc_unwind"))
        if not n or not ip_table or not orc:
            return None
        return OrcTable.from_relative(ip_table, kernel.read(ip_table, 4 * n),
                                      kernel.read(orc, n * self.layout.entry_size), self.layout)

    def unwind(self, regs: dict[str, int], stack_base: int, stack: bytes,
               max_frames: int = MAX_FRAMES, *, at_entry: bool = True) -> list[int]:
        ip = regs[self.pc_reg]
        out = [ip]
        sp = regs.get(self.sp_reg)
        bp = regs.get(self.bp_reg)
        if sp is None:
            return out
        known = regs                # registers whose values this frame knows
        size = len(stack)
        unpack = _U64.unpack_from
        spans = self._spans
        look = ip if at_entry else ip - 1
        table = spans.find(look)
        while table is not None and len(out) < max_frames:
            i = table.find(look)
            if i < 0:
                break
            kind = table.kind[i]
            if kind < KIND_CALL or kind > KIND_REGS_PARTIAL:
                break                           # end of stack, or no unwind data
            # The previous frame's stack pointer (the CFA).
            base, off = table.sp_reg[i], table.sp_off[i]
            if base == ORC_REG_SP:
                cfa = sp + off
            elif base == ORC_REG_BP:
                if bp is None:
                    break
                cfa = bp + off
            elif base == ORC_REG_SP_INDIRECT:   # (%rsp) + offset
                at = sp - stack_base
                if at < 0 or at > size - 8:
                    break
                cfa = unpack(stack, at)[0] + off
            elif base == ORC_REG_BP_INDIRECT:   # (%rbp + offset)
                if bp is None:
                    break
                at = bp + off - stack_base
                if at < 0 or at > size - 8:
                    break
                cfa = unpack(stack, at)[0]
            else:
                value = known.get(_REG_BASES.get(base, ""))
                if value is None:
                    break
                cfa = value
            cfa &= _MASK64
            # The previous frame's IP and SP.
            if kind == KIND_CALL:
                at = cfa - 8 - stack_base
                if at < 0 or at > size - 8:
                    break
                new_ip, new_sp = unpack(stack, at)[0], cfa
                signal = bool(table.signal[i])
                new_known = _NO_REGS
            elif kind == KIND_REGS:              # a full pt_regs at the CFA
                at = cfa - stack_base
                if at < 0 or at > size - self.pt_regs.size:
                    break
                new_known = self._pt_regs(stack, at)
                if new_known["cs"] & 3:
                    break                        # back to user mode: the end
                new_ip, new_sp, signal = new_known["rip"], new_known["rsp"], True
            else:                                # iret frame: ip, cs, flags, sp, ss
                at = cfa - stack_base
                if at < 0 or at > size - self._iret_size:
                    break
                if unpack(stack, at + self._cs_off - self._ip_off)[0] & 3:
                    break
                new_ip = unpack(stack, at)[0]
                new_sp = unpack(stack, at + self._sp_off - self._ip_off)[0]
                signal = True
                new_known = known        # the other registers: the last full set, if any
            # The previous frame's BP.
            base, off = table.bp_reg[i], table.bp_off[i]
            if base == ORC_REG_UNDEFINED:
                bp = new_known.get("rbp", bp)
            elif base == ORC_REG_PREV_SP:
                at = cfa + off - stack_base
                if at < 0 or at > size - 8:
                    break
                bp = unpack(stack, at)[0]
            elif base == ORC_REG_BP:
                if bp is None:
                    break
                at = bp + off - stack_base
                if at < 0 or at > size - 8:
                    break
                bp = unpack(stack, at)[0]
            else:
                break
            # Bad data must not loop: the stack only grows back up.
            if new_sp <= sp and stack_base <= new_sp < stack_base + size:
                break
            look = new_ip if signal else new_ip - 1
            table = spans.find(look)
            if table is None:
                break                            # not kernel or module code
            out.append(new_ip)
            ip, sp, known = new_ip, new_sp, new_known
        return out

    def _pt_regs(self, stack: bytes, at: int) -> dict[str, int]:
        return {name: _U64.unpack_from(stack, at + off)[0]
                for name, off in zip(_PT_REGS_NAMES, self.pt_regs.offsets)}


_NO_REGS: dict[str, int] = {}


# ---------------------------------------------------------------------------
# arm64: frame records


class FrameRecordUnwinder(Unwinder):
    """arm64 kernels (always built with frame pointers): the x29 chain.

    `pac_mask`: the bits pointer authentication may put in a kernel return
    address (NUMBER(KERNELPACMASK), or every bit from VA_BITS up): set again in
    kernel addresses (bit 55 set), cleared in others."""

    pc_reg, sp_reg, fp_reg, lr_reg = "pc", "sp", "x29", "x30"

    def __init__(self, kernel_text: list[tuple[int, int]], pac_mask: int = ~((1 << 48) - 1) & _MASK64):
        super().__init__(kernel_text)
        self.pac_mask = pac_mask & _MASK64

    @classmethod
    def from_kernel(cls, kernel) -> "FrameRecordUnwinder":
        va_bits, pac = 48, 0
        try:
            info = kernel.vmcoreinfo()
        except QemuleakError:
            info = None
        if info is not None:
            va_bits = info.number("VA_BITS") or va_bits
            pac = info.number("KERNELPACMASK") or 0
        unwinder = cls(kernel_text_ranges(kernel.symbols), pac | (_MASK64 & ~((1 << va_bits) - 1)))
        unwinder.refresh_modules(kernel)
        return unwinder

    def strip(self, address: int) -> int:
        """`address` without pointer-authentication bits."""
        if address >> 55 & 1:
            return address | self.pac_mask
        return address & ~self.pac_mask

    def unwind(self, regs: dict[str, int], stack_base: int, stack: bytes,
               max_frames: int = MAX_FRAMES, *, at_entry: bool = True) -> list[int]:
        pc = regs[self.pc_reg]
        out = [pc]
        spans = self._spans
        mask = self.pac_mask
        if at_entry and len(out) < max_frames:
            # The callee has not pushed its frame record yet: its return address
            # is in the link register and x29 is still the caller's frame.
            lr = regs.get(self.lr_reg)
            if lr is None:
                return out
            lr = lr | mask if lr >> 55 & 1 else lr & ~mask
            if spans.find(lr - 4) is None:
                return out
            out.append(lr)
        fp = regs.get(self.fp_reg)
        if fp is None:
            return out
        size = len(stack)
        prev = stack_base - 1
        unpack = _FRAME_RECORD.unpack_from
        while len(out) < max_frames:
            at = fp - stack_base
            if fp & 7 or fp <= prev or at < 0 or at > size - 16:
                break                   # misaligned, going down or round, or not saved
            next_fp, lr = unpack(stack, at)
            lr = lr | mask if lr >> 55 & 1 else lr & ~mask
            # The final record ({0, 0} in the task's pt_regs) ends here too.
            if spans.find(lr - 4) is None:
                break
            out.append(lr)
            prev, fp = fp, next_fp
        return out


# ---------------------------------------------------------------------------
# Which one

_UNWINDERS = {"x86_64": OrcUnwinder, "arm64": FrameRecordUnwinder}


def unwinder_for(kernel) -> Unwinder:
    """The unwinder for the guest kernel's architecture, with its tables loaded
    (the guest must be stopped: module data is read from its memory)."""
    cls = _UNWINDERS.get(kernel.guest.arch.name)
    if cls is None:
        raise QemuleakError(f"no stack unwinder for {kernel.guest.arch.name}",
                            f"qemuleak unwinds {', '.join(_UNWINDERS)} kernels")
    return cls.from_kernel(kernel)
