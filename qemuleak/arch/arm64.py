"""arm64: QEMU's virt machine, PL011 console, 4 KiB granule, 39- to 48-bit VA."""

import numpy as np

from ..errors import QemuleakError
from ..pagetable import PagingFormat
from . import Arch

_ADDR = np.uint64(0x0000FFFFFFFFF000)


def _decode(entries: np.ndarray, shift: int):
    kind = entries & np.uint64(3)
    if shift == 12:
        leaf, table = kind == 3, np.zeros(len(entries), bool)
    else:
        leaf = (kind == 1) if shift in (30, 21) else np.zeros(len(entries), bool)
        table = kind == 3
    block = np.uint64(0x0000FFFFFFFFF000 & ~((1 << shift) - 1))
    return table, leaf, np.where(leaf, entries & block, entries & _ADDR)


def _format(va_bits: int) -> PagingFormat:
    levels = (va_bits - 12 + 8) // 9                  # 39 bits: 3 levels, 48: 4
    shifts = tuple(12 + 9 * i for i in reversed(range(levels)))
    return PagingFormat(shifts=shifts, decode=_decode, kernel_first_index=0, kernel_only=True,
                        bits=va_bits)


class Arm64(Arch):
    name = "arm64"
    debian_arch = "arm64"
    gdb_arch = "aarch64"
    qemu_binary = "qemu-system-aarch64"
    machine_args = ("-M", "virt")
    default_cpu = "cortex-a57"
    console = "ttyAMA0"
    ram_base = 0x40000000
    kbuild_args = ("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-")
    pc_reg, sp_reg = "pc", "sp"
    kernel_window = (0xFFFF000000000000, 0xFFFFFFFFFFFFFFFF)
    system_regs = ("TTBR1_EL1", "TCR_EL1", "VBAR_EL1", "SP_EL0", "TPIDR_EL1")
    arg_regs = ("x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7")
    return_reg = "x0"
    breakpoint_kind = 4
    trace_system_regs = ("SP_EL0",)      # `current`

    def entry_nop(self, code: bytes) -> tuple[int, int] | None:
        # -fpatchable-function-entry=2 leaves two instructions that ftrace turns
        # into "mov x9, x30; nop" at boot (the nop becomes a bl when traced);
        # BTI kernels put a "bti c" first.
        for offset in (0, 4, 8):
            if code[offset:offset + 4] == b"\x1f\x20\x03\xd5":
                return offset, 4
        return None

    def return_site(self, regs: dict[str, int], read_u64) -> tuple[int, int]:
        # `bl` left the return address in x30 (PAC bits, if any, stripped).
        return self.untag(regs["x30"]) | (0xFFFF << 48), regs["sp"]

    def kernel_root_candidates(self, regs: dict[str, int]) -> list[int]:
        return [regs["TTBR1_EL1"] & 0x0000FFFFFFFFFFFE]   # ASID in 63:48, CnP in bit 0

    def kernel_root_fallbacks(self, root: int) -> list[int]:
        # A vCPU on the KPTI entry trampoline has tramp_pg_dir in TTBR1;
        # swapper_pg_dir is two pages above it (tramp, reserved, swapper).
        return [root + 2 * 4096]

    def paging_format(self, regs: dict[str, int]) -> PagingFormat:
        tcr = regs["TCR_EL1"]
        t1sz, tg1 = (tcr >> 16) & 0x3F, (tcr >> 30) & 3
        if tg1 != 2:
            raise QemuleakError("this arm64 guest uses a 16 or 64 KiB page granule",
                                "qemuleak reads 4 KiB-granule kernels only")
        return _format(64 - t1sz)

    def in_kernel(self, regs: dict[str, int]) -> bool:
        return (regs.get("cpsr", 0) >> 2) & 3 >= 1      # exception level EL1 or above

    def percpu_base(self, regs: dict[str, int]) -> int | None:
        return regs.get("TPIDR_EL1")          # the kernel keeps its per-CPU offset here

    def current_task(self, regs: dict[str, int]) -> int | None:
        # In the kernel, SP_EL0 holds `current` (in user mode, the user's stack).
        return regs.get("SP_EL0") if self.in_kernel(regs) else None

    def module_windows(self, stext: int, numbers: dict[str, int]) -> list[tuple[int, int]]:
        # With KASLR, modules go within 2 GiB of the kernel text (module PLTs);
        # without, into MODULES_VADDR..MODULES_END.
        windows = [(max(stext - (2 << 30), 0xFFFF000000000000), min(stext + (2 << 30), 1 << 64))]
        if "MODULES_VADDR" in numbers and "MODULES_END" in numbers:
            windows.append((numbers["MODULES_VADDR"], numbers["MODULES_END"]))
        return windows

    def untag(self, address: int) -> int:
        # Kernel pointers may carry a tag in the top byte (TBI); the real one is 0xff.
        return address | (0xFF << 56) if address >> 55 & 1 else address & ~(0xFF << 56)

    def _va_bits_phys_offset(self, kernel) -> tuple[int, int] | None:
        """VA_BITS and PHYS_OFFSET (memstart_addr) from vmcoreinfo."""
        info = kernel.vmcoreinfo()
        va_bits, phys = info.number("VA_BITS"), info.number("PHYS_OFFSET")
        if va_bits is None or phys is None:
            return None
        if phys >> 63:                    # memstart_addr is an s64: KASLR may make it negative
            phys -= 1 << 64
        return va_bits, phys

    def vmemmap(self, kernel) -> int | None:
        # VMEMMAP_START - (memstart_addr >> PAGE_SHIFT). vmcoreinfo has VMEMMAP_START
        # since 6.0: take it, since newer kernels (6.12: VMEMMAP_END - VMEMMAP_SIZE,
        # below -1 GiB) moved it from -2**(VA_BITS - 6) (64-byte struct page), 6.1's.
        known = self._va_bits_phys_offset(kernel)
        if known is None:
            return None
        va_bits, phys = known
        start = kernel.vmcoreinfo().number("VMEMMAP_START")
        if start is None:
            start = (1 << 64) - (1 << (va_bits - 6))
        return (start - (phys >> 12) * kernel.types.sizeof("struct page")) & ((1 << 64) - 1)

    def linear_offset(self, kernel) -> int | None:
        # __phys_to_virt: (phys - PHYS_OFFSET) | PAGE_OFFSET, PAGE_OFFSET = -2**VA_BITS
        known = self._va_bits_phys_offset(kernel)
        if known is None:
            return None
        va_bits, phys = known
        return ((1 << 64) - (1 << va_bits) - phys) & ((1 << 64) - 1)

    def untag_words(self, words):
        # bit 55 copied into the top byte: a sign extension from bit 55
        out = np.left_shift(words, np.uint64(8))
        np.right_shift(out.view(np.int64), 8, out=out.view(np.int64))
        return out


ARCH = Arm64()
