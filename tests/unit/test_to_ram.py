"""Unit tests for qemuleak.scan.to_ram on page tables built by hand: kernel virtual
segments to segments of the RAM copy, checked against a plain per-segment loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuleak.memory import RamRange
from qemuleak.pagetable import PageTables
from qemuleak.reach import Segments
from qemuleak.scan import to_ram
from qemuleak.snapshot import RamCopy
from tests.unit.test_pagetable import A48, GiB, MiB, PAGE, X4, Builder, Flavor, per_entry_walk

# Two RAM ranges, the second at a higher offset in the RAM copy than in the guest.
RANGES = [RamRange(0x0, 8 * MiB, 0), RamRange(0x4000_0000, 8 * MiB, 8 * MiB)]


class Kernel:
    """All to_ram asks of a kernel: `kernel.guest.page_tables()`."""

    def __init__(self, tables: PageTables):
        self.guest = self
        self.tables = tables

    def page_tables(self) -> PageTables:
        return self.tables


def expected(tables: PageTables, ram: RamCopy, owner, va, length) -> list[tuple[int, int, int]]:
    """(owner, offset, length) to_ram should give, one segment and one page-table
    piece at a time: per cluster of addresses, segments inside one piece first (in
    address order), then those cut where pieces end."""
    segs = sorted((v, i) for i, (v, n) in enumerate(zip(va, length)) if v >= 1 << 63 and n > 0)
    clusters, reach = [], 0
    for v, i in segs:
        # a new cluster after a gap over 1 GiB, and where a segment overlaps one before
        if not clusters or not 0 <= v - reach <= GiB:
            clusters.append([])
        clusters[-1].append(i)
        reach = max(reach, v + length[i])
    out = []
    for c in clusters:
        lo, hi = va[c[0]], max(va[i] + length[i] for i in c)
        pieces = sorted((m.va + a - m.pa, r.offset + a - r.gpa, b - a)
                        for m in per_entry_walk(tables, lo, hi) for r in ram.ranges
                        for a, b in [(max(m.pa, r.gpa), min(m.pa + m.size, r.end))] if a < b)
        inside, cut = [], []
        for i in c:
            s, e = va[i], va[i] + length[i]
            home = [p for p in pieces if p[0] <= s and e <= p[0] + p[2]]
            if home:
                inside.append((owner[i], home[0][1] + s - home[0][0], e - s))
                continue
            for p_va, p_off, p_size in pieces:
                a, b = max(s, p_va), min(e, p_va + p_size)
                if a < b:
                    cut.append((owner[i], p_off + a - p_va, b - a))
        out += inside + cut
    return out


def triples(s: Segments) -> list[tuple[int, int, int]]:
    assert s.owner.dtype == s.offset.dtype == s.length.dtype == np.int64
    return list(zip(s.owner.tolist(), s.offset.tolist(), s.length.tolist()))


def layout(flavor: Flavor, base: int) -> Builder:
    """Linear-map-like 4 KiB pages and a 2 MiB block, vmalloc-like scattered pages,
    pages outside RAM and across the end of a RAM range, and a far cluster."""
    b = Builder(flavor, table_base=0x4000_0000 + 7 * MiB)
    b.map(base, 0x20_0000, 2 * MiB)
    for i in range(40):
        b.map(base + 2 * MiB + i * PAGE, 0x40_0000 + i * PAGE)        # contiguous after it
    for i, pa in enumerate([0x1000, 0x7000, 0x4000_2000, 0x4000_1000, 0x9000_0000, 0x3000]):
        b.map(base + 4 * MiB + i * PAGE, pa)                          # scattered, one not RAM
    b.map(base + 6 * MiB, 0x7F_F000)                                  # last page of range 0...
    b.map(base + 6 * MiB + PAGE, 0x80_0000)                           # ...then not RAM
    b.map(base + 6 * MiB + 2 * PAGE, 0x4000_0000)                     # first page of range 1
    b.map(base + 5 * GiB, 0x4020_0000, 2 * MiB)                       # another cluster
    b.map(base + 5 * GiB + 2 * MiB, 0x4050_0000)
    return b


# 2 MiB aligned, a few pages above the lowest kernel address at least
BASES = {X4.name: 0xFFFF888000000000, A48.name: 0xFFFF000080000000}


@pytest.mark.parametrize("flavor", [X4, A48], ids=lambda f: f.name)
def test_to_ram_cuts_segments_where_pages_and_ram_end(flavor):
    base = BASES[flavor.name]
    tables = layout(flavor, base).walker()
    ram = RamCopy(np.zeros(16 * MiB, np.uint8), RANGES)
    va = [base + 0x100, base + 2 * MiB - 8, base + 4 * MiB + 0x800, base + 4 * MiB + 0x10,
          base + 6 * MiB + PAGE - 8, base + 5 * GiB + 2 * MiB - 4, base + 3 * MiB, 0x1000,
          base + 0x200, base + 4 * MiB + 5 * PAGE + 8, base + 5 * GiB + 4, base + 0x120]
    length = [64, 16, 5 * PAGE, 0x20, 3 * PAGE, 8, 64, 64, 0, 64, 2 * MiB, 8]
    owner = list(range(len(va)))
    got = triples(to_ram(Kernel(tables), ram, owner, va, length))
    assert got == expected(tables, ram, owner, va, length)
    assert got[:3] == [(0, 0x20_0100, 64), (11, 0x20_0120, 8), (1, 0x40_0000 - 8, 16)]
    assert (3, 0x1010, 0x20) in got                                 # inside one scattered page
    assert [g for g in got if g[0] == 2] == [                       # cut into pages, RAM only
        (2, 0x1800, 0x800), (2, 0x7000, PAGE), (2, 8 * MiB + 0x2000, PAGE),
        (2, 8 * MiB + 0x1000, PAGE), (2, 0x3000, 0x800)]
    assert [g for g in got if g[0] == 4] == [(4, 8 * MiB - 8, 8), (4, 8 * MiB, PAGE)]
    assert not [g for g in got if g[0] in (6, 7, 8)]               # unmapped, user, empty
    assert got[-2:] == [(5, 8 * MiB + 0x40_0000 - 4, 4), (5, 8 * MiB + 0x50_0000, 4)]


def test_to_ram_of_nothing():
    tables = layout(X4, BASES[X4.name]).walker()
    ram = RamCopy(np.zeros(16 * MiB, np.uint8), RANGES)
    for va, n in [([], []), ([0x1000], [8]), ([BASES[X4.name] + 8 * MiB], [8])]:
        assert len(to_ram(Kernel(tables), ram, list(range(len(va))), va, n)) == 0


@st.composite
def segment_sets(draw, base: int):
    """Segments around the interesting places of `layout`, of any length."""
    near = st.sampled_from([0, 2 * MiB, 3 * MiB, 4 * MiB, 4 * MiB + 5 * PAGE, 6 * MiB,
                            5 * GiB, 5 * GiB + 2 * MiB, 9 * GiB])
    n = draw(st.integers(1, 30))
    va = [base + draw(near) + draw(st.integers(-3 * PAGE, 3 * PAGE)) for _ in range(n)]
    length = [draw(st.sampled_from([0, 1, 8, 64, PAGE, 3 * PAGE, 2 * MiB]))
              + draw(st.integers(0, 64)) for _ in range(n)]
    return [draw(st.integers(-1, 5)) for _ in range(n)], va, length


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flavor=st.sampled_from([X4, A48]), data=st.data())
def test_property_to_ram(flavor, data):
    base = BASES[flavor.name]
    owner, va, length = data.draw(segment_sets(base))
    tables = layout(flavor, base).walker()
    ram = RamCopy(np.zeros(16 * MiB, np.uint8), RANGES)
    got = triples(to_ram(Kernel(tables), ram, owner, va, length))
    assert got == expected(tables, ram, owner, va, length)


@pytest.mark.parametrize("flavor", [X4, A48], ids=lambda f: f.name)
def test_guest_array_views_one_piece_and_reads_the_rest(flavor):
    """Guest.array: a view of the RAM copy for one mapped piece in one RAM range,
    else the bytes `read` gives (pages scattered, or across RAM ranges)."""
    from qemuleak.errors import GuestMemoryError
    from qemuleak.guest import Guest
    base = BASES[flavor.name]
    b = layout(flavor, base)
    data = np.arange(16 * MiB, dtype=np.uint32).view(np.uint8).copy()[:16 * MiB]
    ram = RamCopy(data, RANGES)
    guest = Guest(None, None, [], "ram", RANGES, False)
    guest.mem = ram
    guest._tables = b.walker()                  # its tables live in the builder's memory
    one = guest.array(base + 0x1000, 0x3000)                      # inside the 2 MiB block
    assert one.base is not None and np.shares_memory(one, data)
    assert one.tobytes() == ram.read(0x20_1000, 0x3000)
    scattered = guest.array(base + 4 * MiB, 2 * PAGE)              # two pages far apart
    assert not np.shares_memory(scattered, data)
    assert scattered.tobytes() == ram.read(0x1000, PAGE) + ram.read(0x7000, PAGE)
    assert ram.view(0x7F_F000, 2 * PAGE) is None                  # runs off range 0
    long = guest.array(base + 2 * MiB, 40 * PAGE)                  # a long read, by mapping
    assert long.tobytes() == ram.read(0x40_0000, 40 * PAGE)
    with pytest.raises(GuestMemoryError):
        guest.read(base + 4 * MiB + 4 * PAGE, 0x20000)             # not RAM inside
