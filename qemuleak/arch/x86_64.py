"""x86_64: QEMU's pc machine, 8250 console, 4- or 5-level paging."""

import numpy as np

from ..errors import QemuleakError
from ..pagetable import PagingFormat
from . import Arch

_ADDR = np.uint64(0x000FFFFFFFFFF000)
_PS = np.uint64(1 << 7)
_P = np.uint64(1)
CR4_LA57 = 1 << 12


def _decode(entries: np.ndarray, shift: int):
    present = (entries & _P) != 0
    big = (entries & _PS) != 0 if shift in (30, 21) else np.zeros(len(entries), bool)
    leaf = present & (big | (shift == 12))
    table = present & ~leaf
    mask = np.uint64(0x000FFFFFFFFFF000 & ~((1 << shift) - 1)) if shift > 12 else _ADDR
    return table, leaf, np.where(leaf, entries & mask, entries & _ADDR)


FOUR_LEVEL = PagingFormat(shifts=(39, 30, 21, 12), decode=_decode)
FIVE_LEVEL = PagingFormat(shifts=(48, 39, 30, 21, 12), decode=_decode)


class X86_64(Arch):
    name = "x86_64"
    debian_arch = "amd64"
    gdb_arch = "i386:x86-64"
    qemu_binary = "qemu-system-x86_64"
    machine_args = ("-M", "pc")
    default_cpu = "max,la57=off"   # 4-level paging, like most machines; la57=on for 5-level
    console = "ttyS0"
    ram_base = 0
    pc_reg, sp_reg = "rip", "rsp"
    kernel_window = (0xFFFFFFFF80000000, 0xFFFFFFFFC0000000)
    arg_regs = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
    return_reg = "rax"
    breakpoint_kind = 1

    def entry_nop(self, code: bytes) -> tuple[int, int] | None:
        # The 5-byte NOP that CONFIG_DYNAMIC_FTRACE leaves for __fentry__,
        # after an ENDBR64 when the kernel has IBT.
        for offset in (0, 4):
            if code[offset:offset + 5] == b"\x0f\x1f\x44\x00\x00":
                return offset, 5
        return None

    def return_site(self, regs: dict[str, int], read_u64) -> tuple[int, int]:
        # `call` pushed the return address; `ret` pops it.
        return read_u64(regs["rsp"]), regs["rsp"] + 8

    def kernel_root_candidates(self, regs: dict[str, int]) -> list[int]:
        # Bits 0-11 are the PCID; with page-table isolation a vCPU stopped in user
        # mode runs on the user half of an 8 KiB PGD pair, the kernel's is below.
        # Without it (no PAGE_TABLE_ISOLATION, e.g. the tinyconfig-based no-ftrace
        # guest) a PGD is one 4 KiB page, at an odd page as often as not: the page
        # CR3 names comes first, the pair's lower half second (the fuller one wins,
        # the first on a tie).
        exact = regs["cr3"] & 0x000FFFFFFFFFF000
        return [exact] if exact & 0x1000 == 0 else [exact, exact & ~0x1FFF]

    def paging_format(self, regs: dict[str, int]) -> PagingFormat:
        return FIVE_LEVEL if regs["cr4"] & CR4_LA57 else FOUR_LEVEL

    def in_kernel(self, regs: dict[str, int]) -> bool:
        return regs.get("cs", 0x10) & 3 == 0

    def module_windows(self, stext: int, numbers: dict[str, int]) -> list[tuple[int, int]]:
        return [(0xFFFFFFFFC0000000, 0xFFFFFFFFFF000000)]     # MODULES_VADDR..MODULES_END

    def vmemmap(self, kernel) -> int | None:
        # vmemmap_base moves with KASLR's memory randomization
        at = kernel.symbols.get("vmemmap_base")
        if at is None and kernel.info is not None:
            at = kernel.info.symbol("vmemmap_base")
        if at is None:     # no DYNAMIC_MEMORY_LAYOUT (tinyconfig, no KASLR): fixed
            return _fixed(kernel, VMEMMAP_START_L4)
        return kernel.read_u64(at)

    def linear_offset(self, kernel) -> int | None:
        # page_offset_base moves with KASLR's memory randomization too
        at = kernel.symbols.get("page_offset_base")
        if at is None and kernel.info is not None:
            at = kernel.info.symbol("page_offset_base")
        if at is None:     # no DYNAMIC_MEMORY_LAYOUT (tinyconfig, no KASLR): fixed
            return _fixed(kernel, PAGE_OFFSET_L4)
        return kernel.read_u64(at)

    def percpu_base(self, regs: dict[str, int]) -> int | None:
        # The kernel's GS base is the per-CPU offset (per-CPU data is linked at 0);
        # in user mode swapgs has parked it in KERNEL_GS_BASE.
        return regs["gs_base"] if self.in_kernel(regs) else regs.get("k_gs_base")


# A kernel without CONFIG_DYNAMIC_MEMORY_LAYOUT (no RANDOMIZE_MEMORY and no X86_5LEVEL,
# e.g. tinyconfig plus what a guest needs) has neither page_offset_base nor
# vmemmap_base: its direct map and vmemmap sit at 4-level paging's fixed bases.
PAGE_OFFSET_L4 = 0xFFFF888000000000      # __PAGE_OFFSET_BASE_L4
VMEMMAP_START_L4 = 0xFFFFEA0000000000    # __VMEMMAP_BASE_L4


def _fixed(kernel, base: int) -> int | None:
    """`base` if the kernel's page tables map it (the fixed layout is in use), else None."""
    try:
        kernel.guest.page_tables().translate(base)
    except QemuleakError:
        return None
    return base


ARCH = X86_64()
