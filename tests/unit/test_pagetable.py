"""Unit tests for qemuleak.pagetable with the x86_64 and arm64 formats, on page
tables built by hand in a fake guest-physical memory (no QEMU needed)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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


# --------------------------------------------------------------------------
# mapping_arrays(): the level-by-level walk agrees with a walk one entry at a time


def per_entry_walk(pt: PageTables, start: int, end: int) -> list[Mapping]:
    """The mapped pieces of [start, end) found the slow way: recursing into one
    present entry after the other, merging as it goes."""
    out: list[Mapping] = []

    def walk(table: int, level: int, base: int) -> None:
        shift = pt.fmt.shifts[level]
        span = 1 << shift
        entries = np.frombuffer(pt.read_phys(table, PAGE), dtype="<u8")
        is_table, is_leaf, addr = pt.fmt.decode(entries, shift)
        first = max(0, (start - base) >> shift)
        last = min(512, (end - base + span - 1) >> shift)
        for idx in np.flatnonzero((is_table | is_leaf)[first:last]) + first:
            va = base + (int(idx) << shift)
            if is_leaf[idx]:
                lo, hi = max(va, start), min(va + span, end)
                pa = int(addr[idx]) + (lo - va)
                if out and out[-1].va + out[-1].size == lo and out[-1].pa + out[-1].size == pa:
                    out[-1] = Mapping(out[-1].va, out[-1].pa, out[-1].size + hi - lo)
                else:
                    out.append(Mapping(lo, pa, hi - lo))
            else:
                try:
                    walk(int(addr[idx]), level + 1, va)
                except GuestMemoryError:
                    continue

    if start < end:
        walk(pt.root, 0, start & ~((1 << pt.fmt.va_bits) - 1))
    return out


def same_walks(pt: PageTables, start: int, end: int) -> list[Mapping]:
    """mappings() and mapping_arrays() of [start, end), checked against the slow walk."""
    expected = per_entry_walk(pt, start, end)
    va, pa, size = pt.mapping_arrays(start, end)
    assert va.dtype == pa.dtype == size.dtype == np.uint64
    assert list(zip(va.tolist(), pa.tolist(), size.tolist())) == [
        (m.va, m.pa, m.size) for m in expected]
    assert pt.mappings(start, end) == expected
    return expected


# Where each flavour's kernel half starts, and a top-level index inside it to build at.
KERNEL_HALF = {"x86_64-4": (0xFFFF800000000000, 256), "x86_64-5": (0xFF00000000000000, 256),
               "arm64-48": (0xFFFF000000000000, 0), "arm64-39": (0xFFFFFF8000000000, 0)}
ALL_FLAVORS = [X4, X5, A48, A39]


def slot(flavor: Flavor, *indices: int) -> int:
    """The kernel virtual address with these table indices, top level first."""
    low, top = KERNEL_HALF[flavor.name]
    va = low | ((top + indices[0]) << flavor.fmt.shifts[0])
    for shift, idx in zip(flavor.fmt.shifts[1:], indices[1:]):
        va |= idx << shift
    return va


def mixed_tables(flavor: Flavor) -> Builder:
    """Blocks, 4 KiB runs (physically contiguous or not), holes, tables outside
    RAM, one page table shared by several entries, and the very last page."""
    b = Builder(flavor)
    base = slot(flavor, 1)
    b.map(base, 0x4000_0000, GiB)                                  # 1 GiB block
    b.map(base + GiB, 0x8000_0000, 2 * MiB)                        # then 2 MiB, contiguous
    for i in range(600):                                            # 4 KiB pages over two tables
        b.map(base + GiB + 2 * MiB + i * PAGE, 0x8020_0000 + i * PAGE)
    b.map(base + GiB + 2 * MiB + 600 * PAGE, 0x9000_0000)           # physical gap
    b.map(base + GiB + 2 * MiB + 602 * PAGE, 0x9000_1000)           # virtual gap
    b.map(base + GiB + 6 * MiB, 0xA000_0000, 2 * MiB)               # after a hole
    b.set_raw(base + GiB + 8 * MiB, 21, flavor.table(0x7_0000_0000))   # PD/L2 entry outside RAM
    b.set_raw(base + 3 * GiB, 30, flavor.table(0x7_0000_1000))        # PDPT/L1 entry outside RAM
    b.map(base + 4 * GiB + 0x5000, 0x7_1234_5000)                   # leaf outside RAM: kept
    # KASAN's early shadow: one page table under many PMD entries
    shared = base + 5 * GiB
    b.map(shared, 0xB000_0000)
    table = b.table_for(shared, 12)
    for i in range(1, 5):
        b.set_raw(shared + i * 2 * MiB, 21, flavor.table(table))
    b.map((1 << 64) - PAGE, 0xC000_0000)                            # the last page there is
    b.map((1 << 64) - 2 * PAGE, 0xBFFF_F000)
    return b


@pytest.mark.parametrize("flavor", ALL_FLAVORS, ids=lambda f: f.name)
def test_mapping_arrays_agree_with_the_per_entry_walk(flavor):
    b = mixed_tables(flavor)
    pt = b.walker()
    low = KERNEL_HALF[flavor.name][0]
    base = slot(flavor, 1)
    full = same_walks(pt, low, 1 << 64)
    assert len(full) >= 8
    assert full[0] == Mapping(base, 0x4000_0000, GiB + 2 * MiB + 600 * PAGE)
    assert full[-1] == Mapping((1 << 64) - 2 * PAGE, 0xBFFF_F000, 2 * PAGE)
    assert [m.va for m in full if m.pa == 0xB000_0000] == [base + 5 * GiB + i * 2 * MiB
                                                          for i in range(5)]
    for lo, hi in [(base + 0x123, base + GiB + 3 * MiB + 7),       # cut through a block and pages
                   (base + GiB + 0x1000, base + GiB + 0x1010),    # inside one 2 MiB block
                   (base + GiB + 2 * MiB + 599 * PAGE + 9, base + GiB + 7 * MiB),
                   (base + 2 * GiB, base + 4 * GiB + 0x5001),     # holes and tables outside RAM
                   (base + 5 * GiB + 0x800, base + 6 * GiB),
                   ((1 << 64) - PAGE - 1, 1 << 64),
                   ((1 << 64) - 3, (1 << 64) - 1),
                   (base + 0x10, base + 0x10), (base + 0x10, base)]:
        same_walks(pt, lo, hi)


@pytest.mark.parametrize("flavor", ALL_FLAVORS, ids=lambda f: f.name)
def test_mapping_arrays_inside_a_walked_range_are_cut_from_it(flavor):
    b = mixed_tables(flavor)
    pt = b.walker()
    base = slot(flavor, 1)
    pt.mapping_arrays(base, base + 6 * GiB)
    walks = len(pt._walks)
    for lo, hi in [(base + 0x123, base + GiB + 3 * MiB + 7),
                   (base + GiB + 0x1000, base + GiB + 0x1010), (base + 2 * GiB, base + 4 * GiB + 0x5001), (base, base + 6 * GiB),
                   (base + 5 * GiB + 0x800, base + 6 * GiB)]:
        fresh = b.walker().mapping_arrays(lo, hi)
        cut = pt.mapping_arrays(lo, hi)
        assert [a.tolist() for a in cut] == [a.tolist() for a in fresh]
        assert all(a.dtype == np.uint64 for a in cut)
    assert len(pt._walks) == walks                # no walk again
    va, pa, size = pt.mapping_arrays(base, base + 6 * GiB)
    va[:] = 0                                     # the caller's copy
    assert pt.mapping_arrays(base, base + 6 * GiB)[0].tolist() == b.walker().mapping_arrays(
        base, base + 6 * GiB)[0].tolist()


@pytest.mark.parametrize("flavor", ALL_FLAVORS, ids=lambda f: f.name)
def test_mapping_arrays_of_nothing(flavor):
    pt = Builder(flavor).walker()
    low = KERNEL_HALF[flavor.name][0]
    for lo, hi in [(low, 1 << 64), (low + 5, low + 5), (low + 5, low)]:
        va, pa, size = pt.mapping_arrays(lo, hi)
        assert len(va) == len(pa) == len(size) == 0
        assert va.dtype == pa.dtype == size.dtype == np.uint64


@pytest.mark.parametrize("flavor", ALL_FLAVORS, ids=lambda f: f.name)
def test_mapping_arrays_root_outside_ram(flavor):
    pt = PageTables(FakeRAM().read_phys, 0x7_0000_0000, flavor.fmt)
    low = KERNEL_HALF[flavor.name][0]
    with pytest.raises(GuestMemoryError):
        pt.mapping_arrays(low, 1 << 64)
    with pytest.raises(GuestMemoryError):
        per_entry_walk(pt, low, 1 << 64)


def test_mapping_arrays_linear_map_of_4k_pages():
    # arm64 maps its linear map with 4 KiB pages: many page tables, one mapping.
    b = Builder(A48)
    va = 0xFFFF000040000000
    for i in range(3 * 512 + 17):
        b.map(va + i * PAGE, 0x4000_0000 + i * PAGE)
    pt = b.walker()
    n = 3 * 512 + 17
    assert same_walks(pt, va - GiB, va + GiB) == [Mapping(va, 0x4000_0000, n * PAGE)]
    assert same_walks(pt, va + 700 * PAGE + 1, va + 1500 * PAGE - 1) == [
        Mapping(va + 700 * PAGE + 1, 0x4000_0000 + 700 * PAGE + 1, 800 * PAGE - 2)]


SIZES = st.sampled_from([PAGE, PAGE, PAGE, 2 * MiB, GiB])


@st.composite
def mixed_sets(draw, flavor: Flavor):
    """Leaves of every size (physically contiguous runs often), tables outside
    RAM, and a range to walk, at indices that put them next to each other."""
    levels = len(flavor.fmt.shifts)
    ops = []
    pa = 0x4000_0000
    for _ in range(draw(st.integers(1, 12))):
        size = draw(SIZES)
        indices = [draw(st.sampled_from([0, 1, 2, 255, 510, 511])) for _ in range(levels)]
        indices[0] %= 4 if flavor is A39 else 256
        va = slot(flavor, *indices) & ~(size - 1)
        kind = draw(st.sampled_from(["next", "next", "new", "outside"]))
        if kind == "outside" and size > PAGE:
            ops.append(("outside", va, size.bit_length() - 1))
            continue
        pa = draw(st.integers(0, 1 << 27)) << 12 if kind == "new" else pa
        pa = pa & ~(size - 1)
        for k in range(draw(st.integers(1, 3)) if size == PAGE else 1):
            ops.append(("map", va + k * size, pa, size))
            pa += size
    vas = [op[1] for op in ops]
    low = KERNEL_HALF[flavor.name][0]
    point = st.one_of(st.just(low), st.just(1 << 64), st.integers(low, (1 << 64) - 1),
                      st.sampled_from(vas).flatmap(lambda v: st.integers(v - 2 * PAGE, v + 3 * PAGE)))
    lo, hi = sorted([draw(point), draw(point)])
    return ops, max(lo, low), min(hi, 1 << 64)


def check_mixed(flavor: Flavor, data) -> None:
    ops, lo, hi = data
    b = Builder(flavor)
    for n, op in enumerate(ops):
        if op[0] == "map":
            b.map(*op[1:])
        else:
            b.set_raw(op[1], op[2], flavor.table(0x7_0000_0000 + n * PAGE))
    pt = b.walker()
    same_walks(pt, lo, hi)
    same_walks(pt, KERNEL_HALF[flavor.name][0], 1 << 64)


@PROPERTY
@given(data=mixed_sets(X4))
def test_property_mapping_arrays_x86_four_level(data):
    check_mixed(X4, data)


@PROPERTY
@given(data=mixed_sets(X5))
def test_property_mapping_arrays_x86_five_level(data):
    check_mixed(X5, data)


@PROPERTY
@given(data=mixed_sets(A48))
def test_property_mapping_arrays_arm64_48bit(data):
    check_mixed(A48, data)


@PROPERTY
@given(data=mixed_sets(A39))
def test_property_mapping_arrays_arm64_39bit(data):
    check_mixed(A39, data)


@pytest.mark.parametrize("flavor,va,alias", [
    (X4, 0xFFFF888000000000, 0x0000888000000000),      # non-canonical
    (X4, 0xFFFF888000000000, 0xFFFF088000000000),
    (X5, 0xFF11000000000000, 0xFE11000000000000),
    (A48, 0xFFFF000000000000, 0xFFFE000000000000),      # below the TTBR1 range
    (A39, 0xFFFFFF8000000000, 0xFFFFFF0000000000),
])
def test_mapping_arrays_outside_the_translated_range(flavor, va, alias):
    # Like translate(): the index bits of an address outside the range would
    # alias a mapped one; a range reaching out of it keeps only what is inside.
    b = Builder(flavor)
    b.map(va, 0x4000_0000, 2 * MiB)
    pt = b.walker()
    assert pt.mappings(alias, alias + 2 * MiB) == []
    assert pt.mappings(va - 0x1000, va + 0x1000) == [Mapping(va, 0x4000_0000, 0x1000)]
    if alias >> 63:                                      # same half as va
        assert pt.mappings(alias + 0x1000, va + 0x1000) == [Mapping(va, 0x4000_0000, 0x1000)]
