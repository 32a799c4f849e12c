"""Walk a guest's page tables: virtual to guest-physical, one address or whole ranges.

The radix walk is the same on every architecture; what an entry means (present,
table, leaf, output address) comes from the arch's `PagingFormat`. Table pages
are cached per walker, so make a new `PageTables` after the guest has run.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import GuestMemoryError

PAGE = 4096

ReadPhys = Callable[[int, int], bytes]


@dataclass(frozen=True)
class PagingFormat:
    """How one architecture's (4 KiB granule) page tables are laid out."""

    shifts: tuple[int, ...]     # VA bit each level indexes, top level first: (39, 30, 21, 12)
    # entries -> (table mask, leaf mask, output address) at the level with `shift`
    decode: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
    # first top-level entry of the kernel half: 256 where one table maps both
    # halves (x86_64), 0 where the kernel has a table of its own (arm64 TTBR1)
    kernel_first_index: int = 256
    # the tables map only the upper (kernel) half: arm64 TTBR1
    kernel_only: bool = False
    # virtual address bits, when the top level is not a full 9-bit one (arm64 T1SZ)
    bits: int | None = None

    @property
    def va_bits(self) -> int:
        return self.bits or self.shifts[0] + 9


@dataclass(frozen=True)
class Mapping:
    """`size` bytes of virtual memory at `va` backed by guest-physical `pa`."""

    va: int
    pa: int
    size: int


class PageTables:
    """The page tables rooted at guest-physical `root` (a PGD / TTBR base)."""

    def __init__(self, read_phys: ReadPhys, root: int, fmt: PagingFormat):
        self.read_phys = read_phys
        self.root = root
        self.fmt = fmt
        self._tables: dict[int, np.ndarray] = {}
        # Leaves walked so far, by (shift, va >> shift): the direct map's 1 GiB and
        # 2 MiB pages make most later translations one dictionary lookup.
        self._leaves: dict[tuple[int, int], int] = {}
        self._leaf_shifts = tuple(sorted({sh for sh in fmt.shifts if sh <= 30}, reverse=True))

    def invalidate(self) -> None:
        """Forget the table pages and translations so far (the guest has run since)."""
        self._tables.clear()
        self._leaves.clear()

    def _table(self, pa: int) -> np.ndarray:
        t = self._tables.get(pa)
        if t is None:
            t = np.frombuffer(self.read_phys(pa, PAGE), dtype="<u8")
            self._tables[pa] = t
        return t

    def _index_bits(self, va: int) -> int:
        return va & ((1 << self.fmt.va_bits) - 1)

    def translate(self, va: int) -> int:
        """Guest-physical address of `va`; GuestMemoryError if it is not mapped."""
        bits = self.fmt.va_bits
        if self.fmt.kernel_only:                  # TTBR1: the bits above va_bits all set
            ok = va >> bits == (1 << (64 - bits)) - 1
        else:                                     # canonical: bits 63..va_bits-1 equal
            ok = va >> (bits - 1) in (0, (1 << (65 - bits)) - 1)
        if not ok:
            raise GuestMemoryError(f"virtual address {va:#x} is not mapped (outside the "
                                   f"{'kernel' if self.fmt.kernel_only else 'canonical'} range)")
        for shift in self._leaf_shifts:
            base = self._leaves.get((shift, va >> shift))
            if base is not None:
                return base | (va & ((1 << shift) - 1))
        table = self.root
        for shift in self.fmt.shifts:
            idx = (self._index_bits(va) >> shift) & 0x1FF
            entry = self._table(table)[idx:idx + 1]
            is_table, is_leaf, addr = self.fmt.decode(entry, shift)
            if is_leaf[0]:
                self._leaves[(shift, va >> shift)] = int(addr[0])
                return int(addr[0]) | (va & ((1 << shift) - 1))
            if not is_table[0]:
                break
            table = int(addr[0])
        raise GuestMemoryError(f"virtual address {va:#x} is not mapped")

    def kernel_top_entries(self) -> list[int]:
        """Indices of the present entries of the kernel half of the top-level table."""
        is_table, is_leaf, _ = self.fmt.decode(self._table(self.root), self.fmt.shifts[0])
        first = self.fmt.kernel_first_index
        return [i for i in np.flatnonzero(is_table | is_leaf).tolist() if i >= first]

    def mappings(self, start: int, end: int) -> list[Mapping]:
        """Every mapped piece of [start, end), adjacent pieces merged.

        `start` and `end` lie in the same half of the address space."""
        out: list[Mapping] = []
        if start >= end:
            return out
        high = start & ~((1 << self.fmt.va_bits) - 1)   # the sign-extension bits
        self._walk(self.root, 0, high, start, end, out)
        return out

    def _walk(self, table: int, level: int, base: int, start: int, end: int,
              out: list[Mapping]) -> None:
        """Walk `table`, whose first entry maps virtual address `base`."""
        shift = self.fmt.shifts[level]
        span = 1 << shift
        is_table, is_leaf, addr = self.fmt.decode(self._table(table), shift)
        first = max(0, (start - base) >> shift)
        last = min(512, (end - base + span - 1) >> shift)
        present = np.flatnonzero((is_table | is_leaf)[first:last]) + first
        for idx in present.tolist():
            va = base + (idx << shift)
            if is_leaf[idx]:
                lo, hi = max(va, start), min(va + span, end)
                pa = int(addr[idx]) + (lo - va)
                prev = out[-1] if out else None
                if prev and prev.va + prev.size == lo and prev.pa + prev.size == pa:
                    out[-1] = Mapping(prev.va, prev.pa, prev.size + hi - lo)
                else:
                    out.append(Mapping(lo, pa, hi - lo))
            else:
                try:
                    self._walk(int(addr[idx]), level + 1, va, start, end, out)
                except GuestMemoryError:
                    continue    # a table outside RAM: nothing there we could read
