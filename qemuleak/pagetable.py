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
_WALKS = 32          # ranges walked that a PageTables keeps, the latest

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
        self._decodes: dict[tuple[int, int], tuple] = {}
        self._pages: dict[int, int] = {}          # va >> 12 -> pa of that page
        # Leaves walked so far, by (shift, va >> shift): the direct map's 1 GiB and
        # 2 MiB pages make most later translations one dictionary lookup.
        self._leaves: dict[tuple[int, int], int] = {}
        self._leaf_shifts = tuple(sorted({sh for sh in fmt.shifts if sh <= 30}, reverse=True))
        self._index_mask = (1 << fmt.va_bits) - 1
        # Ranges walked so far, as (start, end, va, pa, size): a scan asks for the
        # same runs (objects, roots, cleaning) several times.
        self._walks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []

    def invalidate(self) -> None:
        """Forget the table pages and translations so far (the guest has run since)."""
        self._tables.clear()
        self._decodes.clear()
        self._leaves.clear()
        self._pages.clear()
        self._walks.clear()

    def _table(self, pa: int) -> np.ndarray:
        t = self._tables.get(pa)
        if t is None:
            t = np.frombuffer(self.read_phys(pa, PAGE), dtype="<u8")
            self._tables[pa] = t
        return t

    def _decoded(self, pa: int, shift: int) -> tuple[list, list, list]:
        """The table at `pa` decoded as a level-`shift` table, once: decoding one
        entry costs as much as decoding all 512. As lists: a walk then indexes
        Python values, not numpy scalars."""
        d = self._decodes.get((pa, shift))
        if d is None:
            d = self._decodes[(pa, shift)] = tuple(
                a.tolist() for a in self.fmt.decode(self._table(pa), shift))
        return d

    def translate(self, va: int) -> int:
        """Guest-physical address of `va`; GuestMemoryError if it is not mapped."""
        page = self._pages.get(va >> 12)          # the fastest path: this page before
        if page is not None:                      # (only valid addresses get there)
            return page | (va & 0xFFF)
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
                pa = base | (va & ((1 << shift) - 1))
                self._pages[va >> 12] = pa & ~0xFFF
                return pa
        table = self.root
        index = va & self._index_mask
        for shift in self.fmt.shifts:
            idx = (index >> shift) & 0x1FF
            is_table, is_leaf, addr = self._decoded(table, shift)
            if is_leaf[idx]:
                self._leaves[(shift, va >> shift)] = addr[idx]
                pa = addr[idx] | (va & ((1 << shift) - 1))
                self._pages[va >> 12] = pa & ~0xFFF
                return pa
            if not is_table[idx]:
                break
            table = addr[idx]
        raise GuestMemoryError(f"virtual address {va:#x} is not mapped")

    def kernel_top_entries(self) -> list[int]:
        """Indices of the present entries of the kernel half of the top-level table."""
        is_table, is_leaf, _ = self.fmt.decode(self._table(self.root), self.fmt.shifts[0])
        first = self.fmt.kernel_first_index
        return [i for i in np.flatnonzero(is_table | is_leaf).tolist() if i >= first]

    def mappings(self, start: int, end: int) -> list[Mapping]:
        """Every mapped piece of [start, end), adjacent pieces merged.

        `start` and `end` lie in the same half of the address space; what
        `translate` rejects as outside the translated range maps nothing."""
        va, pa, size = self.mapping_arrays(start, end)
        return [Mapping(v, p, n) for v, p, n in zip(va.tolist(), pa.tolist(), size.tolist())]

    def mapping_arrays(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`mappings` as uint64 arrays (va, pa, size), in address order.

        The walk goes level by level: all entries of one level that overlap the
        range are decoded at once, so no Python runs per entry. A range inside
        one walked before is cut from that walk's pieces."""
        start, end = self._translated(start, end)
        if start >= end:
            return _no_pieces()
        for lo, hi, va, pa, size in self._walks:
            if lo <= start and end <= hi:
                return _cut(va, pa, size, start, end)
        va, pa, size = self._walk(start, end)
        self._walks = [*self._walks[-(_WALKS - 1):], (start, end, va, pa, size)]
        return _cut(va, pa, size, start, end)

    def _walk(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`mapping_arrays` of a non-empty range of the translated half, walked."""
        self._table(self.root)          # a root outside RAM is an error, a table below it is not
        tables = [(self.root, start & ~((1 << self.fmt.va_bits) - 1))]
        found = []
        for shift in self.fmt.shifts:
            entries, vas = self._entries(tables, shift, start, end)
            if not len(entries):
                break
            is_table, is_leaf, addr = self.fmt.decode(entries, shift)
            if is_leaf.all():           # a linear map's page tables: skip the copies
                found.append(_leaves(vas, addr, shift, start, end))
            elif is_leaf.any():
                found.append(_leaves(vas[is_leaf], addr[is_leaf], shift, start, end))
            tables = list(zip(addr[is_table].tolist(), vas[is_table].tolist()))
        if len(found) <= 1:
            return found[0] if found else _no_pieces()
        va, pa, size = (np.concatenate(a) for a in zip(*found))
        order = np.argsort(va, kind="stable")
        return _merged(va[order], pa[order], size[order])

    def _translated(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) cut to the half that `translate` accepts addresses of: the
        tables would alias the addresses outside it."""
        bits = self.fmt.va_bits
        if self.fmt.kernel_only or start >> 63:
            low = (1 << 64) - (1 << (bits if self.fmt.kernel_only else bits - 1))
            return max(start, low), min(end, 1 << 64)
        return start, min(end, 1 << (bits - 1))

    def _entries(self, tables: list[tuple[int, int]], shift: int, start: int,
                 end: int) -> tuple[np.ndarray, np.ndarray]:
        """The entries of `tables` (each a table's address and the virtual address
        its first entry maps) that overlap [start, end), and the addresses they map."""
        span = 1 << shift
        parts, starts, counts = [], [], []
        total = 0
        for pa, base in tables:
            first = max(0, (start - base) >> shift)
            stop = min(512, (end - base + span - 1) >> shift)
            if stop <= first:
                continue
            try:
                parts.append(self._table(pa)[first:stop])
            except GuestMemoryError:
                continue        # a table outside RAM: nothing there we could read
            # joined entry i (of this table) maps this + i * span, mod 2**64
            starts.append((base + (first - total) * span) % (1 << 64))
            counts.append(stop - first)
            total += stop - first
        if not parts:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        vas = (np.repeat(np.array(starts, np.uint64), counts)
               + np.arange(0, total * span, span, dtype=np.uint64))
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), vas


def _no_pieces() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint64)


def _cut(va: np.ndarray, pa: np.ndarray, size: np.ndarray, start: int,
         end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces (in address order, disjoint, each maximal) cut to [start, end), as
    new arrays: what a walk of just [start, end) finds."""
    last = va + (size - np.uint64(1))               # 2**64 - 1 at most
    i = int(np.searchsorted(last, np.uint64(start)))
    j = int(np.searchsorted(va, np.uint64(end - 1), side="right"))
    va, pa, last = va[i:j].copy(), pa[i:j].copy(), last[i:j].copy()
    if len(va):
        cut = np.uint64(max(0, start - int(va[0])))
        va[0] += cut
        pa[0] += cut
        last[-1] = min(int(last[-1]), end - 1)
    return va, pa, last - va + np.uint64(1)


def _leaves(va: np.ndarray, pa: np.ndarray, shift: int, start: int,
            end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leaves mapping `1 << shift` bytes each at `va` from `pa` (in address order,
    all overlapping [start, end)) merged where contiguous in both, cut to [start, end)."""
    span = np.uint64(1 << shift)
    breaks = np.flatnonzero((np.diff(va) != span) | (np.diff(pa) != span)) + 1
    firsts = np.concatenate(([0], breaks))
    lo, lo_pa = va[firsts], pa[firsts]
    last = va[np.append(breaks - 1, len(va) - 1)] + (span - np.uint64(1))   # 2**64 - 1 at most
    # only the first leaf may start before `start`, only the last end after `end`
    cut = np.uint64(max(0, start - int(lo[0])))
    lo[0] += cut
    lo_pa[0] += cut
    last[-1] = min(int(last[-1]), end - 1)
    return lo, lo_pa, last - lo + np.uint64(1)


def _merged(va: np.ndarray, pa: np.ndarray,
            size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces in address order with each run contiguous in both va and pa joined."""
    if len(va) < 2:
        return va, pa, size
    joins = (va[1:] == va[:-1] + size[:-1]) & (pa[1:] == pa[:-1] + size[:-1])
    firsts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return va[firsts], pa[firsts], np.add.reduceat(size, firsts)
