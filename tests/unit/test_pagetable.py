"""Unit tests for qemuleak.pagetable with the x86_64 and arm64 formats, on page
tables built by hand in a fake guest-physical memory (no QEMU needed)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuleak.arch.arm64 import Arm64
from qemuleak.arch.x86_64 import FIVE_LEVEL, FOUR_LEVEL, X86_64
from qemuleak.errors import GuestMemoryError, QemuleakError
from qemuleak.pagetable import Mapping, PageTables, PagingFormat

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30

# --------------------------------------------------------------------------
# Fake guest-physical memory


class FakeRAM:
    """Sparse guest RAM made of 4 KiB pages; reading outside it fails."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.reads: list[int] = []

    def add_page(self, pa: int) -> None:
        assert pa % PAGE == 0
        self.pages.setdefault(pa, bytearray(PAGE))

    def read_phys(self, pa: int, size: int) -> bytes:
        self.reads.append(pa)
        out = bytearray()
        while size > 0:
            page, off = pa & ~(PAGE - 1), pa & (PAGE - 1)
            if page not in self.pages:
                raise GuestMemoryError(f"guest-physical {pa:#x} is not RAM")
            n = min(size, PAGE - off)
            out += self.pages[page][off:off + n]
            pa, size = pa + n, size - n
        return bytes(out)

    def set_u64(self, pa: int, value: int) -> None:
        struct.pack_into("<Q", self.pages[pa & ~(PAGE - 1)], pa & (PAGE - 1), value)


def entry_at(ram: FakeRAM, table: int, idx: int, value: int) -> None:
    ram.set_u64(table + 8 * idx, value)


# --------------------------------------------------------------------------
# Entry encodings (with attribute bits set, so that they must be masked off)

# x86_64
X_P, X_RW, X_US, X_A, X_D, X_PS, X_G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
X_PAT_LARGE = 1 << 12           # PAT bit of a 2 MiB / 1 GiB entry
X_NX = 1 << 63
X_PKEY = 0xB << 59              # protection key, bits 62:59
X_AVAIL_HIGH = 1 << 52          # ignored by the MMU


def x_table(pa: int) -> int:
    return pa | X_P | X_RW | X_US | X_A | X_NX | X_AVAIL_HIGH


def x_leaf(pa: int, shift: int) -> int:
    big = X_PS if shift > 12 else 0
    return pa | X_P | X_RW | X_A | X_D | X_G | big | X_NX | X_PKEY


# arm64 (stage 1, 4 KiB granule)
A_TABLE, A_PAGE, A_BLOCK = 0b11, 0b11, 0b01
A_ATTRS = (1 << 10) | (3 << 8) | (1 << 11) | (1 << 2) | (1 << 6)   # AF, SH, nG, AttrIndx, AP
A_UPPER = (1 << 54) | (1 << 53) | (1 << 52) | (1 << 51) | (1 << 50)  # UXN, PXN, Contig, DBM, GP
A_TABLE_UPPER = (1 << 59) | (1 << 60) | (1 << 51) | (1 << 55)     # PXNTable, UXNTable, ignored


def a_table(pa: int) -> int:
    return pa | A_TABLE | A_TABLE_UPPER


def a_leaf(pa: int, shift: int) -> int:
    return pa | (A_PAGE if shift == 12 else A_BLOCK) | A_ATTRS | A_UPPER


def tcr(t1sz: int, tg1: int = 2, t0sz: int = 25, tg0: int = 0) -> int:
    """A TCR_EL1 value with the T1SZ/TG1 asked for and other fields set as Linux does."""
    return (t0sz | (1 << 8) | (1 << 10) | (3 << 12) | (tg0 << 14)
            | (t1sz << 16) | (1 << 24) | (1 << 26) | (3 << 28) | (tg1 << 30)
            | (5 << 32) | (1 << 36) | (1 << 38))


ARM48 = Arm64().paging_format({"TCR_EL1": tcr(16)})
ARM39 = Arm64().paging_format({"TCR_EL1": tcr(25)})


# --------------------------------------------------------------------------
# A page-table builder


@dataclass(frozen=True)
class Flavor:
    name: str
    fmt: PagingFormat
    table: Callable[[int], int]
    leaf: Callable[[int, int], int]


X4 = Flavor("x86_64-4", FOUR_LEVEL, x_table, x_leaf)
X5 = Flavor("x86_64-5", FIVE_LEVEL, x_table, x_leaf)
A48 = Flavor("arm64-48", ARM48, a_table, a_leaf)
A39 = Flavor("arm64-39", ARM39, a_table, a_leaf)


class Builder:
    """Page tables of one flavour in a FakeRAM; table pages from 1 MiB up."""

    def __init__(self, flavor: Flavor, table_base: int = 0x100000):
        self.flavor = flavor
        self.ram = FakeRAM()
        self.next_table = table_base
        self.children: dict[tuple[int, int], int] = {}
        self.root = self.alloc()

    def alloc(self) -> int:
        pa = self.next_table
        self.next_table += PAGE
        self.ram.add_page(pa)
        return pa

    def table_for(self, va: int, shift: int) -> int:
        """The table holding the entry for `va` at level `shift`, created as needed."""
        table = self.root
        for s in self.flavor.fmt.shifts:
            if s == shift:
                return table
            key = (table, (va >> s) & 0x1FF)
            if key not in self.children:
                self.children[key] = self.alloc()
                entry_at(self.ram, table, key[1], self.flavor.table(self.children[key]))
            table = self.children[key]
        raise AssertionError(f"no level with shift {shift}")

    def set_raw(self, va: int, shift: int, value: int) -> None:
        entry_at(self.ram, self.table_for(va, shift), (va >> shift) & 0x1FF, value)

    def map(self, va: int, pa: int, size: int = PAGE) -> None:
        shift = size.bit_length() - 1
        assert va % size == 0 and pa % size == 0
        self.set_raw(va, shift, self.flavor.leaf(pa, shift))

    def walker(self) -> PageTables:
        return PageTables(self.ram.read_phys, self.root, self.flavor.fmt)


def not_mapped(pt: PageTables, va: int) -> None:
    with pytest.raises(GuestMemoryError, match=f"{va:#x} is not mapped"):
        pt.translate(va)


# --------------------------------------------------------------------------
# x86_64, tables written by hand (indices independent of the builder)


def test_x86_four_level_hand_built_walk():
    ram = FakeRAM()
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    for p in (pml4, pdpt, pd, pt):
        ram.add_page(p)
    # 0xffff888123456abc: PML4 0x111, PDPT 0x4, PD 0x11a, PT 0x56
    entry_at(ram, pml4, 0x111, x_table(pdpt))
    entry_at(ram, pdpt, 0x4, x_table(pd))
    entry_at(ram, pd, 0x11A, x_table(pt))
    entry_at(ram, pt, 0x56, x_leaf(0x7654_3000, 12))
    tables = PageTables(ram.read_phys, pml4, FOUR_LEVEL)
    assert tables.translate(0xFFFF888123456ABC) == 0x7654_3ABC
    assert tables.translate(0xFFFF888123456000) == 0x7654_3000
    assert tables.translate(0xFFFF888123456FFF) == 0x7654_3FFF
    not_mapped(tables, 0xFFFF888123457000)      # PT index 0x57
    not_mapped(tables, 0xFFFF888123256ABC)      # PD index 0x119
    not_mapped(tables, 0xFFFF880123456ABC)      # PML4 index 0x110


def test_x86_five_level_hand_built_walk():
    ram = FakeRAM()
    pml5, pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    for p in (pml5, pml4, pdpt, pd, pt):
        ram.add_page(p)
    # 0xff11000123456abc: PML5 0x111, PML4 0x0, PDPT 0x4, PD 0x11a, PT 0x56
    entry_at(ram, pml5, 0x111, x_table(pml4))
    entry_at(ram, pml4, 0x0, x_table(pdpt))
    entry_at(ram, pdpt, 0x4, x_table(pd))
    entry_at(ram, pd, 0x11A, x_table(pt))
    entry_at(ram, pt, 0x56, x_leaf(0x1_2345_6000, 12))
    tables = PageTables(ram.read_phys, pml5, FIVE_LEVEL)
    assert tables.translate(0xFF11000123456ABC) == 0x1_2345_6ABC
    assert tables.mappings(0xFF11000000000000, 0xFF11000200000000) == [
        Mapping(0xFF11000123456000, 0x1_2345_6000, PAGE)]
    # The same address under 4-level paging indexes other entries.
    with pytest.raises(GuestMemoryError):
        PageTables(ram.read_phys, pml5, FOUR_LEVEL).translate(0xFFFF888123456ABC)


def test_x86_52bit_physical_addresses():
    # x86_64 entries hold physical address bits 51:12, for tables and leaves.
    b = Builder(X4, table_base=0xF_FFFF_FF00_0000)
    va = 0xFFFF888000000000
    b.map(va, 0xF_FFFF_FFFF_F000)
    b.map(va + 2 * MiB, 0xF_FFFF_FFE0_0000, 2 * MiB)
    b.map(va + GiB, 0xF_FFFF_C000_0000, GiB)
    pt = b.walker()
    assert pt.translate(va + 0x123) == 0xF_FFFF_FFFF_F123
    assert pt.translate(va + 2 * MiB + 0x12345) == 0xF_FFFF_FFE1_2345
    assert pt.translate(va + GiB + 0x1234_5678) == 0xF_FFFF_D234_5678
    assert len(pt.mappings(va, va + 2 * GiB)) == 3


def test_tables_are_read_once_per_walker():
    # The root at guest-physical 0, like a table in low RAM.
    b = Builder(X4, table_base=0)
    va = 0xFFFF888000000000
    for i in range(3):
        b.map(va + i * PAGE, 0x40_0000 + i * PAGE)
    b.map(va + 2 * MiB, 0x80_0000, 2 * MiB)
    pt = b.walker()
    assert pt.translate(va + PAGE + 1) == 0x40_1001
    assert pt.translate(va + 2 * PAGE + 2) == 0x40_2002
    assert pt.translate(va + 2 * MiB + 3) == 0x80_0003
    assert pt.mappings(va, va + 4 * MiB) == [Mapping(va, 0x40_0000, 3 * PAGE),
                                            Mapping(va + 2 * MiB, 0x80_0000, 2 * MiB)]
    assert pt.kernel_top_entries() == [0x111]
    assert sorted(b.ram.reads) == sorted(b.ram.pages) == [0, 0x1000, 0x2000, 0x3000]
    # A new walker reads the tables again (and sees what changed).
    b.map(va + 3 * PAGE, 0x9000)
    assert b.walker().translate(va + 3 * PAGE) == 0x9000
    assert len(b.ram.reads) == 8


def test_x86_user_half_address():
    b = Builder(X4)
    b.map(0x00007F1234567000, 0x8_0000_0000)
    pt = b.walker()
    assert pt.translate(0x00007F1234567ABC) == 0x8_0000_0ABC
    assert pt.mappings(0x00007F0000000000, 0x0000800000000000) == [
        Mapping(0x00007F1234567000, 0x8_0000_0000, PAGE)]


# --------------------------------------------------------------------------
# x86_64 leaves


@pytest.mark.parametrize("flavor,va", [
    (X4, 0xFFFF888000000000),
    (X4, 0xFFFFFFFF81000000),
    (X5, 0xFF11000000000000),
    (X5, 0xFF7FFFFFC0000000),
])
def test_x86_4k_page(flavor, va):
    b = Builder(flavor)
    b.map(va + 0x5000, 0xABCDE000)
    pt = b.walker()
    assert pt.translate(va + 0x5000) == 0xABCDE000
    assert pt.translate(va + 0x5123) == 0xABCDE123
    assert pt.translate(va + 0x5FFF) == 0xABCDEFFF
    not_mapped(pt, va + 0x4FFF)
    not_mapped(pt, va + 0x6000)


@pytest.mark.parametrize("flavor,va", [(X4, 0xFFFF888000000000), (X5, 0xFF11000000000000)])
def test_x86_2m_page_keeps_offset_and_drops_pat(flavor, va):
    b = Builder(flavor)
    b.set_raw(va + 2 * MiB, 21, x_leaf(0x4060_0000, 21) | X_PAT_LARGE)
    pt = b.walker()
    assert pt.translate(va + 2 * MiB) == 0x4060_0000
    assert pt.translate(va + 2 * MiB + 0x1ABCDE) == 0x4060_0000 + 0x1ABCDE
    assert pt.translate(va + 4 * MiB - 1) == 0x4080_0000 - 1
    not_mapped(pt, va + 4 * MiB)
    not_mapped(pt, va + 2 * MiB - 1)
    assert pt.mappings(va, va + 8 * MiB) == [Mapping(va + 2 * MiB, 0x4060_0000, 2 * MiB)]


@pytest.mark.parametrize("flavor,va", [(X4, 0xFFFF888000000000), (X5, 0xFF11000000000000)])
def test_x86_1g_page_keeps_offset_and_drops_pat(flavor, va):
    b = Builder(flavor)
    b.set_raw(va + GiB, 30, x_leaf(0x3_C000_0000, 30) | X_PAT_LARGE)
    pt = b.walker()
    assert pt.translate(va + GiB) == 0x3_C000_0000
    assert pt.translate(va + GiB + 0x3ABCDEF0) == 0x3_C000_0000 + 0x3ABCDEF0
    assert pt.translate(va + GiB + 0x1234) == 0x3_C000_1234     # bit 12 of the offset is kept
    not_mapped(pt, va + 2 * GiB)
    assert pt.mappings(va, va + 4 * GiB) == [Mapping(va + GiB, 0x3_C000_0000, GiB)]


def test_x86_pat_bit_of_a_4k_page_is_not_ps():
    # In a PTE bit 7 is PAT, not PS: still a 4 KiB page, address unchanged.
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.set_raw(va, 12, 0x1234_5000 | X_P | X_PS | X_NX)
    pt = b.walker()
    assert pt.translate(va + 0x10) == 0x1234_5010
    assert pt.mappings(va, va + 2 * MiB) == [Mapping(va, 0x1234_5000, PAGE)]


@pytest.mark.parametrize("flavor,va,alias", [
    # non-canonical: same index bits as a mapped address, wrong sign extension
    (X4, 0xFFFF888123456000, 0x0000888123456000),
    (X4, 0xFFFF888123456000, 0x7FFF888123456000),
    (X4, 0x00007F1234567000, 0xFFFF7F1234567000),
    (X5, 0xFF11000123456000, 0x0111000123456000),
    (X5, 0x00FF000123456000, 0xFEFF000123456000),
    # arm64 TTBR1 maps the addresses whose bits above va_bits are all set, only
    (A48, 0xFFFF000012345000, 0x0000000012345000),
    (A48, 0xFFFF800012345000, 0x7FFF800012345000),
    (A39, 0xFFFFFF8012345000, 0x0000000012345000),
    (A39, 0xFFFFFFC012345000, 0xFFFFFF4012345000),
])
def test_addresses_outside_the_translated_range(flavor, va, alias):
    b = Builder(flavor)
    b.map(va, 0x5000)
    pt = b.walker()
    assert pt.translate(va + 0x10) == 0x5010
    not_mapped(pt, alias + 0x10)


@pytest.mark.parametrize("shift", [39, 30, 21, 12])
def test_x86_non_present_entry_is_not_mapped(shift):
    va = 0xFFFF888123456ABC
    b = Builder(X4)
    b.map(va & ~0xFFF, 0x9000)
    # Clear the present bit at one level, leaving the address and the rest in place.
    table = b.table_for(va, shift)
    idx = (va >> shift) & 0x1FF
    slot = table + 8 * idx
    value = struct.unpack_from("<Q", b.ram.pages[table], 8 * idx)[0]
    assert value & X_P
    b.ram.set_u64(slot, value & ~X_P)
    pt = b.walker()
    not_mapped(pt, va)
    assert pt.mappings(0xFFFF800000000000, 1 << 64) == []


@pytest.mark.parametrize("shift", [30, 21])
def test_x86_non_present_large_entry_is_not_mapped(shift):
    va = 0xFFFF888000000000
    b = Builder(X4)
    b.set_raw(va, shift, x_leaf(0x4000_0000, shift) & ~X_P)
    pt = b.walker()
    not_mapped(pt, va + 0x1000)
    assert pt.mappings(va, va + GiB) == []


def test_x86_empty_tables():
    pt = Builder(X4).walker()
    not_mapped(pt, 0xFFFF888000000000)
    not_mapped(pt, 0)
    assert pt.mappings(0xFFFF800000000000, 1 << 64) == []
    assert pt.kernel_top_entries() == []


# --------------------------------------------------------------------------
# x86_64 mappings()


def test_x86_mappings_merge_and_split():
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.map(va, 0x0, 2 * MiB)                              # 2 MiB page at pa 0
    b.map(va + 0x200000, 0x200000)                       # 4 KiB pages right after it
    b.map(va + 0x201000, 0x201000)
    b.map(va + 0x202000, 0x900000)                       # virtually next, physically not
    b.map(va + 0x204000, 0x901000)                       # physically next, virtually not
    b.map(va + 0x205000, 0x902000)
    b.map(va + 0x3FFFF000, 0x7FFFF000)                   # last page of the first GiB...
    b.map(va + GiB, 0x80000000, GiB)                     # ...then a 1 GiB page...
    b.map(va + 2 * GiB, 0xC0000000, 2 * MiB)             # ...then a 2 MiB page in another table
    b.map(va + 2 * GiB + 2 * MiB, 0xC0400000, 2 * MiB)   # physical gap of 2 MiB
    pt = b.walker()
    assert pt.mappings(0xFFFF800000000000, 1 << 64) == [
        Mapping(va, 0x0, 0x202000),
        Mapping(va + 0x202000, 0x900000, PAGE),
        Mapping(va + 0x204000, 0x901000, 2 * PAGE),
        Mapping(va + 0x3FFFF000, 0x7FFFF000, PAGE + GiB + 2 * MiB),
        Mapping(va + 2 * GiB + 2 * MiB, 0xC0400000, 2 * MiB),
    ]


def test_x86_mappings_cut_through_large_pages():
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.map(va, 0x4000_0000, 2 * MiB)
    b.map(va + 2 * MiB, 0x4020_0000, 2 * MiB)
    b.map(va + GiB, 0x1_0000_0000, GiB)
    pt = b.walker()
    # start in the first 2 MiB page, end inside the 1 GiB page
    assert pt.mappings(va + 0x123456, va + GiB + 0x5000) == [
        Mapping(va + 0x123456, 0x4012_3456, 4 * MiB - 0x123456),
        Mapping(va + GiB, 0x1_0000_0000, 0x5000),
    ]
    # both ends inside the same 1 GiB page
    assert pt.mappings(va + GiB + 0x1000_0000, va + GiB + 0x1000_0100) == [
        Mapping(va + GiB + 0x1000_0000, 0x1_1000_0000, 0x100)]
    # both ends inside the second 2 MiB page, not page aligned
    assert pt.mappings(va + 3 * MiB + 7, va + 3 * MiB + 0x2009) == [
        Mapping(va + 3 * MiB + 7, 0x4030_0007, 0x2002)]


def test_x86_mappings_cut_through_4k_pages():
    b = Builder(X4)
    va = 0xFFFFFFFF81000000
    for i in range(4):
        b.map(va + i * PAGE, 0x1000000 + i * PAGE)
    pt = b.walker()
    assert pt.mappings(va + 0x800, va + 0x2800) == [Mapping(va + 0x800, 0x1000800, 0x2000)]
    assert pt.mappings(va - 0x10000, va + 0x1) == [Mapping(va, 0x1000000, 1)]
    assert pt.mappings(va + 4 * PAGE, va + 8 * PAGE) == []
    assert pt.mappings(va, va) == []


def test_x86_mappings_empty_range_inside_a_page():
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.map(va, 0x1000)
    b.map(va + 2 * MiB, 0x4000_0000, 2 * MiB)
    pt = b.walker()
    assert pt.mappings(va + 0x800, va + 0x800) == []
    assert pt.mappings(va + 2 * MiB + PAGE, va + 2 * MiB + PAGE) == []


def test_x86_mappings_inverted_range_inside_a_page():
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.map(va, 0x1000)
    assert b.walker().mappings(va + 0x800, va + 0x400) == []


def test_x86_mappings_skip_tables_outside_ram():
    b = Builder(X4)
    va = 0xFFFF888000000000
    b.map(va, 0x1000)
    b.map(va + 2 * GiB, 0x2000)
    # A PDPT entry (the second GiB) and a PD entry (2 MiB..4 MiB) point outside RAM.
    b.set_raw(va + GiB, 30, x_table(0x7_0000_0000))
    b.set_raw(va + 2 * MiB, 21, x_table(0x7_0000_1000))
    # A whole PML4 slot too, ahead of the mappings.
    b.set_raw(0xFFFF880000000000, 39, x_table(0x7_0000_2000))
    # A leaf may point outside RAM: the walker never reads data pages.
    b.map(va + 3 * GiB, 0x7_0000_0000, 2 * MiB)
    pt = b.walker()
    assert pt.mappings(0xFFFF800000000000, 1 << 64) == [
        Mapping(va, 0x1000, PAGE),
        Mapping(va + 2 * GiB, 0x2000, PAGE),
        Mapping(va + 3 * GiB, 0x7_0000_0000, 2 * MiB),
    ]
    with pytest.raises(GuestMemoryError):
        pt.translate(va + GiB)
    with pytest.raises(GuestMemoryError):
        pt.translate(va + 2 * MiB)
    assert pt.translate(va + 3 * GiB + 5) == 0x7_0000_0005


def test_x86_mappings_five_level_kernel_half():
    b = Builder(X5)
    va = 0xFF11000000000000
    b.map(va, 0x0, GiB)
    b.map(va + GiB, GiB, 2 * MiB)
    b.map(va + GiB + 2 * MiB, GiB + 2 * MiB)
    b.map(0xFFD4000000000000, 0x5000)       # a different PML5 slot (vmemmap-like)
    pt = b.walker()
    assert pt.mappings(0xFF00000000000000, 1 << 64) == [
        Mapping(va, 0x0, GiB + 2 * MiB + PAGE),
        Mapping(0xFFD4000000000000, 0x5000, PAGE),
    ]
    assert pt.mappings(va + GiB, 0xFF20000000000000) == [Mapping(va + GiB, GiB, 2 * MiB + PAGE)]
    assert pt.translate(0xFFD4000000000FFF) == 0x5FFF


def test_x86_kernel_top_entries_start_at_256():
    b = Builder(X4)
    for idx in (0, 1, 255, 256, 0x111, 511):
        va = idx << 39
        if idx >= 256:
            va |= 0xFFFF << 48
        b.map(va, 0x1000)
    b.set_raw(0xFFFF800000000000 | (300 << 39), 39, x_table(0x9000) & ~X_P)   # not present
    assert b.walker().kernel_top_entries() == [256, 0x111, 511]


def test_x86_five_level_kernel_top_entries():
    b = Builder(X5)
    b.map(0xFF11000000000000, 0x1000)
    b.map(0xFFFFFFFF81000000, 0x2000)
    b.map(0x00007F0000000000, 0x3000)
    assert b.walker().kernel_top_entries() == [0x111, 511]


def test_x86_arch_paging_format():
    assert X86_64().paging_format({"cr4": 0x3506F0}) is FOUR_LEVEL
    assert X86_64().paging_format({"cr4": 0x3516F0}) is FIVE_LEVEL
    assert FOUR_LEVEL.va_bits == 48 and FIVE_LEVEL.va_bits == 57


# --------------------------------------------------------------------------
# arm64


def test_arm64_paging_format_from_tcr():
    assert ARM48.shifts == (39, 30, 21, 12)
    assert ARM48.va_bits == 48
    assert ARM39.shifts == (30, 21, 12)
    assert ARM39.va_bits == 39
    assert ARM48.kernel_first_index == 0 and ARM39.kernel_first_index == 0
    # T0SZ / TG0 (the user half) do not matter, only T1SZ / TG1.
    assert Arm64().paging_format({"TCR_EL1": tcr(16, t0sz=25, tg0=2)}).shifts == (39, 30, 21, 12)
    assert Arm64().paging_format({"TCR_EL1": tcr(25, t0sz=16, tg0=1)}).shifts == (30, 21, 12)


@pytest.mark.parametrize("tg1", [1, 3, 0])      # 16 KiB, 64 KiB, reserved
def test_arm64_other_granules_are_refused(tg1):
    with pytest.raises(QemuleakError, match="granule"):
        Arm64().paging_format({"TCR_EL1": tcr(16, tg1=tg1)})


def test_arm64_48bit_hand_built_walk():
    ram = FakeRAM()
    l0, l1, l2, l3 = 0x4000_0000, 0x4000_1000, 0x4000_2000, 0x4000_3000
    for p in (l0, l1, l2, l3):
        ram.add_page(p)
    # 0xffff800081234abc: L0 0x100, L1 0x2, L2 0x9, L3 0x34
    entry_at(ram, l0, 0x100, a_table(l1))
    entry_at(ram, l1, 0x2, a_table(l2))
    entry_at(ram, l2, 0x9, a_table(l3))
    entry_at(ram, l3, 0x34, a_leaf(0x4123_4000, 12))
    tables = PageTables(ram.read_phys, l0, ARM48)
    assert tables.translate(0xFFFF800081234ABC) == 0x4123_4ABC
    not_mapped(tables, 0xFFFF800081235ABC)
    assert tables.mappings(0xFFFF800000000000, 1 << 64) == [
        Mapping(0xFFFF800081234000, 0x4123_4000, PAGE)]
    assert tables.kernel_top_entries() == [0x100]


def test_arm64_39bit_hand_built_walk():
    ram = FakeRAM()
    l1, l2, l3 = 0x4000_0000, 0x4000_1000, 0x4000_2000
    for p in (l1, l2, l3):
        ram.add_page(p)
    # 0xffffffc012345abc: L1 0x100, L2 0x91, L3 0x145
    entry_at(ram, l1, 0x100, a_table(l2))
    entry_at(ram, l2, 0x91, a_table(l3))
    entry_at(ram, l3, 0x145, a_leaf(0x8765_4000, 12))
    entry_at(ram, l1, 0x1FF, a_leaf(0xC000_0000, 30))   # a 1 GiB block at the top level
    tables = PageTables(ram.read_phys, l1, ARM39)
    assert tables.translate(0xFFFFFFC012345ABC) == 0x8765_4ABC
    assert tables.translate(0xFFFFFFFFC0001234) == 0xC000_1234
    assert tables.kernel_top_entries() == [0x100, 0x1FF]
    assert tables.mappings(0xFFFFFF8000000000, 1 << 64) == [
        Mapping(0xFFFFFFC012345000, 0x8765_4000, PAGE),
        Mapping(0xFFFFFFFFC0000000, 0xC000_0000, GiB),
    ]


@pytest.mark.parametrize("flavor,va", [
    (A48, 0xFFFF000000000000),      # linear map
    (A48, 0xFFFF800080000000),      # kernel image
    (A39, 0xFFFFFF8000000000),
    (A39, 0xFFFFFFC008000000),
])
def test_arm64_pages_and_blocks(flavor, va):
    b = Builder(flavor)
    if va % GiB == 0:
        b.map(va, 0x4000_0000, GiB)
    b.map(va + 2 * GiB, 0x8_0000_0000 + 4 * MiB, 2 * MiB)
    b.map(va + 3 * GiB + 0x7000, 0xFFFF_FFFF_F000)          # highest 48-bit output address
    pt = b.walker()
    if va % GiB == 0:
        assert pt.translate(va + 0x3FFF_FFFF) == 0x7FFF_FFFF
        assert pt.translate(va + 0x1234_5678) == 0x5234_5678
    else:
        not_mapped(pt, va)
    assert pt.translate(va + 2 * GiB) == 0x8_0040_0000
    assert pt.translate(va + 2 * GiB + 0x1F_FFFF) == 0x8_005F_FFFF
    assert pt.translate(va + 2 * GiB + 0x10_1234) == 0x8_0050_1234
    not_mapped(pt, va + 2 * GiB + 2 * MiB)
    assert pt.translate(va + 3 * GiB + 0x7ABC) == 0xFFFF_FFFF_FABC
    not_mapped(pt, va + 3 * GiB + 0x8000)


def test_arm64_48bit_mappings_merge():
    b = Builder(A48)
    va = 0xFFFF000000000000
    b.map(va, 0x4000_0000, GiB)
    b.map(va + GiB, 0x8000_0000, 2 * MiB)
    b.map(va + GiB + 2 * MiB, 0x8020_0000)
    b.map(va + GiB + 2 * MiB + PAGE, 0x8020_2000)           # physical gap
    b.map(va + 512 * GiB, 0x1_0000_0000)                   # next L0 slot
    pt = b.walker()
    assert pt.mappings(va, 1 << 64) == [
        Mapping(va, 0x4000_0000, GiB + 2 * MiB + PAGE),
        Mapping(va + GiB + 2 * MiB + PAGE, 0x8020_2000, PAGE),
        Mapping(va + 512 * GiB, 0x1_0000_0000, PAGE),
    ]
    assert pt.mappings(va + GiB - 0x10, va + GiB + 0x10) == [
        Mapping(va + GiB - 0x10, 0x7FFF_FFF0, 0x20)]
    assert pt.kernel_top_entries() == [0, 1]


@pytest.mark.parametrize("flavor,shift", [
    (A48, 39), (A48, 30), (A48, 21), (A48, 12), (A39, 30), (A39, 21), (A39, 12)])
def test_arm64_invalid_descriptor(flavor, shift):
    va = 0xFFFF000012345000 if flavor is A48 else 0xFFFFFF8012345000
    b = Builder(flavor)
    b.map(va, 0x4000_0000)
    table, idx = b.table_for(va, shift), (va >> shift) & 0x1FF
    value = struct.unpack_from("<Q", b.ram.pages[table], 8 * idx)[0]
    assert value & 3 == 3
    b.ram.set_u64(table + 8 * idx, value & ~3)      # bits[1:0] 0b00: invalid, address left
    pt = b.walker()
    not_mapped(pt, va)
    assert pt.mappings(va & ~((1 << flavor.fmt.va_bits) - 1), 1 << 64) == []
    if shift == flavor.fmt.shifts[0]:
        assert pt.kernel_top_entries() == []


def test_arm64_l3_descriptor_0b01_is_invalid():
    va = 0xFFFF000012345000
    b = Builder(A48)
    b.set_raw(va, 12, 0x4000_0000 | A_BLOCK | A_ATTRS)
    b.map(va + PAGE, 0x4000_1000)
    pt = b.walker()
    not_mapped(pt, va)
    assert pt.mappings(va, va + 2 * PAGE) == [Mapping(va + PAGE, 0x4000_1000, PAGE)]


def test_arm64_l0_block_is_not_a_leaf():
    # A block is not allowed at level 0 with a 4 KiB granule: 0b01 there is invalid,
    # neither a 512 GiB block nor a table.
    va = 0xFFFF000000000000
    b = Builder(A48)
    b.map(va, 0x4000_0000, GiB)                   # a real L1 table under L0[0]...
    l1 = b.children[(b.root, 0)]
    b.ram.set_u64(b.root, l1 | A_BLOCK | A_ATTRS)  # ...now marked as an L0 "block"
    b.map(va + 512 * GiB, 0x1000)                 # L0[1] is fine
    pt = b.walker()
    not_mapped(pt, va)
    not_mapped(pt, va + 0x1234)
    not_mapped(pt, va + 5 * GiB)
    assert pt.mappings(va, 1 << 64) == [Mapping(va + 512 * GiB, 0x1000, PAGE)]
    assert pt.kernel_top_entries() == [1]


def test_arm64_39bit_mappings_from_top_level_blocks():
    b = Builder(A39)
    va = 0xFFFFFF8000000000
    b.map(va, 0x4000_0000, GiB)
    b.map(va + GiB, 0x8000_0000, GiB)
    b.map(va + 2 * GiB, 0x4000_0000, 2 * MiB)              # aliases the first GiB
    pt = b.walker()
    assert pt.mappings(va + 0x100, 1 << 64) == [
        Mapping(va + 0x100, 0x4000_0100, 2 * GiB - 0x100),
        Mapping(va + 2 * GiB, 0x4000_0000, 2 * MiB),
    ]
    assert pt.kernel_top_entries() == [0, 1, 2]


def test_arm64_mappings_skip_tables_outside_ram():
    b = Builder(A48)
    va = 0xFFFF000000000000
    b.set_raw(va, 39, a_table(0x7_0000_0000))                  # L0[0] outside RAM
    b.set_raw(va + 512 * GiB, 30, a_table(0x7_0000_1000))      # L1 entry outside RAM
    b.map(va + 513 * GiB, 0x4000_0000, GiB)
    pt = b.walker()
    assert pt.mappings(va, 1 << 64) == [Mapping(va + 513 * GiB, 0x4000_0000, GiB)]
    with pytest.raises(GuestMemoryError):
        pt.translate(va)
    assert pt.kernel_top_entries() == [0, 1]


def test_arm64_42bit_va_indexes_level0_with_bits_41_39():
    ram = FakeRAM()
    l0, l1, l2, l3 = 0x4000_0000, 0x4000_1000, 0x4000_2000, 0x4000_3000
    for p in (l0, l1, l2, l3):
        ram.add_page(p)
    # 42-bit kernel VA 0xfffffd0012345000: L0 index = VA[41:39] = 2 (of 8 entries),
    # L1 0x000, L2 0x091, L3 0x145.
    va = 0xFFFFFD0012345000
    entry_at(ram, l0, 2, a_table(l1))
    entry_at(ram, l1, 0x000, a_table(l2))
    entry_at(ram, l2, 0x091, a_table(l3))
    entry_at(ram, l3, 0x145, a_leaf(0x4567_8000, 12))
    fmt = Arm64().paging_format({"TCR_EL1": tcr(22)})
    assert PageTables(ram.read_phys, l0, fmt).translate(va + 0x10) == 0x4567_8010


# --------------------------------------------------------------------------
# Property: random 4 KiB mappings round-trip through translate() and mappings()

# Indices per level chosen so that pages share tables, sit next to each other
# (also across table boundaries: ...,511 then 0 of the next table) and spread out.
IDX = st.sampled_from([0, 1, 2, 3, 255, 510, 511])
TOP = {
    "x86_64-4-kernel": st.sampled_from([256, 257, 0x111, 510, 511]),
    "x86_64-4-user": st.sampled_from([0, 1, 2, 254, 255]),
    "arm64-48": st.sampled_from([0, 1, 2, 255, 256, 510, 511]),
}
FLAVOR = {"x86_64-4-kernel": X4, "x86_64-4-user": X4, "arm64-48": A48}
HIGH = {"x86_64-4-kernel": 0xFFFF000000000000, "x86_64-4-user": 0, "arm64-48": 0xFFFF000000000000}


@st.composite
def page_sets(draw, kind: str):
    span_lo, span_hi = HIGH[kind], HIGH[kind] + (1 << 48)
    if kind == "x86_64-4-kernel":
        span_lo = 0xFFFF800000000000
    elif kind == "x86_64-4-user":
        span_hi = 0x0000800000000000
    # Runs of virtually consecutive pages (crossing table boundaries when they
    # start at index 510 or 511), each page often physically next to the one before.
    runs = draw(st.lists(st.tuples(TOP[kind], IDX, IDX, IDX, st.integers(1, 12)),
                         min_size=1, max_size=8))
    starts = [(HIGH[kind] | (a << 39) | (b << 30) | (c << 21) | (d << 12), n)
              for a, b, c, d, n in runs]
    vas = sorted({v + k * PAGE for v, n in starts for k in range(n) if v + k * PAGE < span_hi})
    pages: dict[int, int] = {}
    pa = None
    for va in vas:
        if pa is None or not draw(st.booleans()):
            pa = draw(st.integers(0, (1 << 36) - 1)) << 12
        else:
            pa = (pa + PAGE) % (1 << 48)
        pages[va] = pa
    lo = draw(st.one_of(st.just(span_lo), st.sampled_from(vas).map(lambda v: v + 0x800),
                        st.integers(span_lo, span_hi - 1)))
    hi = draw(st.one_of(st.just(span_hi), st.sampled_from(vas).map(lambda v: v + 0x1800),
                        st.integers(lo, span_hi)))
    return pages, lo, max(lo + 1, hi)


def expected_mappings(pages: dict[int, int], lo: int, hi: int) -> list[Mapping]:
    out: list[Mapping] = []
    for va in sorted(pages):
        a, b = max(va, lo), min(va + PAGE, hi)
        if a >= b:
            continue
        pa = pages[va] + (a - va)
        if out and out[-1].va + out[-1].size == a and out[-1].pa + out[-1].size == pa:
            out[-1] = Mapping(out[-1].va, out[-1].pa, out[-1].size + b - a)
        else:
            out.append(Mapping(a, pa, b - a))
    return out


def check_pages(kind: str, data, offsets) -> None:
    pages, lo, hi = data
    b = Builder(FLAVOR[kind], table_base=0x1_0000_0000)
    for va, pa in pages.items():
        b.map(va, pa)
    pt = b.walker()
    for i, (va, pa) in enumerate(pages.items()):
        off = offsets[i] if i < len(offsets) else PAGE - 1
        assert pt.translate(va) == pa
        assert pt.translate(va + off) == pa + off
    for va in pages:
        for neighbour in (va - PAGE, va + PAGE):
            if neighbour not in pages and HIGH[kind] <= neighbour < HIGH[kind] + (1 << 48):
                not_mapped(pt, neighbour)
    assert pt.mappings(lo, hi) == expected_mappings(pages, lo, hi)
    full_lo = 0xFFFF800000000000 if kind == "x86_64-4-kernel" else HIGH[kind]
    full_hi = 0x0000800000000000 if kind == "x86_64-4-user" else 1 << 64
    full = pt.mappings(full_lo, full_hi)
    assert full == expected_mappings(pages, full_lo, full_hi)
    assert sum(m.size for m in full) == PAGE * len(pages)


PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(data=page_sets("x86_64-4-kernel"), offsets=st.lists(st.integers(0, PAGE - 1), max_size=100))
def test_property_x86_four_level_kernel(data, offsets):
    check_pages("x86_64-4-kernel", data, offsets)


@PROPERTY
@given(data=page_sets("x86_64-4-user"), offsets=st.lists(st.integers(0, PAGE - 1), max_size=100))
def test_property_x86_four_level_user(data, offsets):
    check_pages("x86_64-4-user", data, offsets)


@PROPERTY
@given(data=page_sets("arm64-48"), offsets=st.lists(st.integers(0, PAGE - 1), max_size=100))
def test_property_arm64_48bit(data, offsets):
    check_pages("arm64-48", data, offsets)
