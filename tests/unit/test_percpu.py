"""The per-CPU chunk map decoded from a chunk laid out in a fake kernel memory the
way mm/percpu.c lays it out (allocation and boundary bitmaps)."""

import struct

import numpy as np
import pytest

from qemuleak.errors import QemuleakError
from qemuleak.kernel import percpu

OFFSETS = {"list": 0, "base_addr": 16, "alloc_map": 24, "bound_map": 32,
           "start_offset": 40, "end_offset": 44, "nr_pages": 48}


class FakeTypes:
    def offsetof(self, struct_name, field):
        assert struct_name == "struct pcpu_chunk"
        return OFFSETS[field]


class FakeKernel:
    """Sparse little-endian memory plus a symbol table."""

    def __init__(self):
        self.mem: dict[int, int] = {}
        self.symbols: dict[str, int] = {}
        self.types = FakeTypes()

    def write(self, at: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[at + i] = b

    def read(self, at: int, n: int) -> bytes:
        try:
            return bytes(self.mem[at + i] for i in range(n))
        except KeyError as e:
            raise QemuleakError(f"unmapped {e.args[0]:#x}") from None

    def read_u64(self, at):
        return int.from_bytes(self.read(at, 8), "little")

    def read_u32(self, at):
        return int.from_bytes(self.read(at, 4), "little")


def bitmap(bits: int, ones) -> bytes:
    m = np.zeros((bits + 63) // 64 * 64, np.uint8)
    m[list(ones)] = 1
    return np.packbits(m, bitorder="little").tobytes()


def make_kernel(allocs, freed_bounds=(), start=8, end=0, pages=1, slots=3):
    """One chunk of `pages` pages (1024 map bits each) with `allocs` (bit, bits)
    allocated; `start`/`end` bits hidden at either end; extra stale boundary bits
    (`freed_bounds`) left behind in free space, as pcpu_free_area leaves them."""
    k = FakeKernel()
    bits = pages * 1024
    chunk, lists, amap, bmap = 0x1000, 0x9000, 0x20000, 0x30000
    k.symbols.update(pcpu_first_chunk=0x100, pcpu_chunk_lists=0x108, pcpu_nr_slots=0x110,
                     pcpu_base_addr=0x118, __per_cpu_start=0)    # x86_64: 0
    k.write(0x100, struct.pack("<Q", chunk))
    k.write(0x108, struct.pack("<Q", lists))
    k.write(0x110, struct.pack("<I", slots))
    k.write(0x118, struct.pack("<Q", 0xffff888000000000))
    for s in range(slots):                      # slot 1 holds the chunk
        head = lists + 16 * s
        nxt = chunk if s == 1 else head
        k.write(head, struct.pack("<QQ", nxt, nxt))
    k.write(chunk, struct.pack("<QQ", lists + 16, lists + 16))
    k.write(chunk + 16, struct.pack("<QQQ", 0xffff888000100000, amap, bmap))
    k.write(chunk + 40, struct.pack("<iiI", start * 4, end * 4, pages))
    used = [(0, start)] + list(allocs) + ([(bits - end, end)] if end else [])
    k.write(amap, bitmap(bits, [b for s, n in used for b in range(s, s + n)]))
    k.write(bmap, bitmap(bits + 1, [b for s, n in used for b in (s, s + n)] + list(freed_bounds)
                         + [bits]))
    return k


def test_allocations_and_free_space():
    k = make_kernel([(8, 4), (12, 12), (40, 2)], freed_bounds=(30,), end=16)
    m = percpu.chunk_map(k)
    assert m.start.tolist() == [32, 48, 160] and m.size.tolist() == [16, 48, 8]
    assert set(m.base.tolist()) == {0x100000}         # cookie of unit offset 0
    assert m.cookies().tolist() == [0x100020, 0x100030, 0x1000a0]
    # free: bits 24..40 (a stale boundary inside does not split it) and 42..1008
    assert list(zip(m.free_start.tolist(), m.free_size.tolist())) == \
        [(96, 64), (168, (1008 - 42) * 4)]


def test_bitmaps_read_exactly_as_long_as_allocated():
    # 1024 bits: BITS_TO_LONGS gives 16 longs for the allocation map, 17 for the
    # boundary map; reading one long more would run off a vmalloc'd map
    k = make_kernel([(8, 1016)])
    m = percpu.chunk_map(k)
    assert m.size.tolist() == [1016 * 4] and len(m.free_start) == 0


def test_not_a_chunk():
    k = make_kernel([])
    k.write(0x1000 + 48, struct.pack("<I", 0))
    with pytest.raises(QemuleakError, match="not a chunk"):
        percpu.chunk_map(k)


def test_missing_symbols():
    k = make_kernel([])
    del k.symbols["pcpu_chunk_lists"]
    with pytest.raises(QemuleakError, match="pass --vmlinux or --system-map"):
        percpu.chunk_map(k)
