"""Unit tests for qemuleak.kernel.slub on synthetic memory: freelist chains laid out
in a RAM copy the way SLUB lays them out (hardened or not), and kmem_cache structs
in a fake kernel memory."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemuleak.errors import QemuleakError
from qemuleak.kernel import slub
from qemuleak.kernel.slub import Cache, Slabs
from qemuleak.memory import RamRange
from qemuleak.snapshot import RamCopy

LINEAR = 0xFFFF888000000000
RAM = 16 * 4096
KEY = 0x5A5A_1234_DEAD_BEEF
U64 = np.uint64


def cache(size: int = 64, offset: int = 32, hardened: bool = False, red: int = 0) -> Cache:
    return Cache(0xFFFF888000F00000, "test", size, size, offset, KEY if hardened else None, red, 0, ())


def swab(x: int) -> int:
    return int.from_bytes(x.to_bytes(8, "little"), "big")


class Heap:
    """A RAM copy with one slab per page from page 1 on, all of one cache."""

    def __init__(self, c: Cache, objects: list[int]):
        self.c = c
        self.ram = RamCopy(np.zeros(RAM, np.uint8), [RamRange(0, RAM, 0)])
        n = len(objects)
        self.slabs = Slabs(np.zeros(n, np.int64), U64(LINEAR) + U64(4096) * np.arange(1, n + 1, dtype=U64),
                           np.array(objects, np.int64), np.zeros(n, np.int64), np.zeros(n, U64),
                           np.zeros(n, U64), np.zeros(n, U64))

    def slot(self, slab: int, i: int) -> int:
        """Address of object slot `i` of slab `slab`."""
        return int(self.slabs.base[slab]) + self.c.red_left_pad + i * self.c.size

    def link(self, at_object: int, next_object: int) -> None:
        """Store `next_object` as the free pointer of the object at `at_object`."""
        at = at_object + self.c.offset
        value = next_object ^ (KEY ^ swab(at) if self.c.random is not None else 0)
        self.ram.data[at - LINEAR:at - LINEAR + 8] = np.frombuffer(struct.pack("<Q", value), np.uint8)

    def chain(self, slab: int, slots: list[int], end: int = 0) -> int:
        """Link slots `slots` of `slab` in that order, the last to `end`: the head."""
        addresses = [self.slot(slab, i) for i in slots]
        for a, b in zip(addresses, addresses[1:] + [end]):
            self.link(a, b)
        return addresses[0]

    def walk(self, heads: list[int], slab: list[int]) -> tuple[set[int], set[int]]:
        """(free addresses, slabs with a broken chain)."""
        free, broken = slub._walk_freelists(slub._Reader(self.ram, LINEAR), np.array(heads, U64),
                                            np.array(slab, np.int64), self.slabs, [self.c])
        return set(free.tolist()), set(broken.tolist())


@pytest.mark.parametrize("hardened", [False, True])
def test_chains_are_followed_in_any_order(hardened):
    h = Heap(cache(hardened=hardened, red=16), [16, 8])
    heads = [h.chain(0, [5, 0, 15, 3]), h.chain(1, [7, 6, 1])]
    free, broken = h.walk(heads + [0], [0, 1, 1])             # 0: an empty freelist
    assert free == {h.slot(0, i) for i in (5, 0, 15, 3)} | {h.slot(1, i) for i in (7, 6, 1)}
    assert broken == set()


@pytest.mark.parametrize("bad", ["inside a slot", "other slab", "past the end", "garbage"])
def test_a_bad_pointer_ends_the_chain_and_names_its_slab(bad):
    h = Heap(cache(hardened=True), [8, 8])
    target = {"inside a slot": h.slot(0, 6) + 8, "other slab": h.slot(1, 2),
              "past the end": h.slot(0, 8), "garbage": 0x1234}[bad]
    head = h.chain(0, [1, 4, 2], end=target)
    free, broken = h.walk([head], [0])
    assert free == {h.slot(0, i) for i in (1, 4, 2)}          # found before the break
    assert broken == {0}


def test_a_bad_head_finds_nothing():
    h = Heap(cache(), [8])
    free, broken = h.walk([h.slot(0, 3) + 1], [0])
    assert (free, broken) == (set(), {0})


def test_a_cycle_is_broken_and_its_objects_free():
    h = Heap(cache(hardened=True), [32])
    head = h.chain(0, [9, 2, 30, 4], end=h.slot(0, 2))
    free, broken = h.walk([head], [0])
    assert free == {h.slot(0, i) for i in (9, 2, 30, 4)}
    assert broken == {0}


def test_a_self_loop_is_broken():
    h = Heap(cache(), [4, 4])
    ok = h.chain(1, [0, 1])
    free, broken = h.walk([h.chain(0, [3], end=h.slot(0, 3)), ok], [0, 1])
    assert free == {h.slot(0, 3), h.slot(1, 0), h.slot(1, 1)}
    assert broken == {0}


def test_chains_that_merge_are_not_broken():
    """A slab's freelist and a CPU's that share a tail (as the walk always took
    them): both are followed, the shared objects counted once."""
    h = Heap(cache(), [16])
    tail = h.chain(0, [10, 11, 12])
    first = h.chain(0, [1, 2], end=tail)
    second = h.chain(0, [5], end=tail)
    free, broken = h.walk([first, second], [0, 0])
    assert free == {h.slot(0, i) for i in (1, 2, 5, 10, 11, 12)}
    assert broken == set()


def test_the_longest_chain_a_slab_can_hold():
    h = Heap(cache(size=8, offset=0), [512])
    order = np.random.default_rng(0).permutation(512).tolist()
    free, broken = h.walk([h.chain(0, order)], [0])
    assert len(free) == 512 and broken == set()


def reference_walk(h: Heap, heads: list[int], slab: list[int]) -> tuple[set[int], set[int]]:
    """The walk as the module docstring tells it, one chain and one object at a time."""
    free, broken = set(), set()
    for head, s in zip(heads, slab):
        slots = {h.slot(s, i) for i in range(int(h.slabs.objects[s]))}
        cur, seen = head, set()
        while cur:
            if cur not in slots or cur in seen:          # no slot of its slab, or a cycle
                broken.add(s)
                break
            seen.add(cur)
            at = cur + h.c.offset
            raw = int.from_bytes(h.ram.data[at - LINEAR:at - LINEAR + 8].tobytes(), "little")
            cur = raw ^ (KEY ^ swab(at) if h.c.random is not None else 0)
        free |= seen
    return free, broken


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_walk_agrees_with_one_chain_at_a_time(data):
    hardened = data.draw(st.booleans())
    objects = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    h = Heap(cache(hardened=hardened), objects)
    for s, n in enumerate(objects):                      # each slot: NULL, a slot, or junk
        for i in range(n):
            kind = data.draw(st.sampled_from(["end", "slot", "slot", "slot", "other", "junk"]))
            target = {"end": 0, "junk": h.slot(s, 0) + 8,
                      "slot": h.slot(s, data.draw(st.integers(0, n - 1))),
                      "other": h.slot(data.draw(st.integers(0, len(objects) - 1)), 0)}[kind]
            h.link(h.slot(s, i), target)
    chains = data.draw(st.lists(st.tuples(st.integers(0, len(objects) - 1), st.integers(-1, 40)),
                                max_size=6))
    slab = [s for s, _ in chains]
    heads = [0 if i < 0 else h.slot(s, i) for s, i in chains]   # a slot past the end: a bad head
    assert h.walk(heads, slab) == reference_walk(h, heads, slab)


def test_unique_is_numpys():
    values = np.array([5, 3, 5, 0, 2**64 - 1, 3], U64)
    assert np.array_equal(slub._unique(values), np.unique(values))
    assert len(slub._unique(np.zeros(0, U64))) == 0


class FakeTypes:
    OFFSETS = {
        "struct kmem_cache": {"cpu_slab": 0, "flags": 8, "size": 24, "object_size": 28,
                              "offset": 40, "inuse": 80, "red_left_pad": 88, "name": 96,
                              "list": 104, "random": 184, "node": 216},
        "struct kmem_cache_cpu": {"freelist": 0, "slab": 16},
        "struct kmem_cache_node": {"partial": 8},
        "struct slab": {"slab_list": 8},
    }

    def __init__(self, hardened: bool = True):
        self.offsets = {name: dict(members) for name, members in self.OFFSETS.items()}
        if not hardened:
            del self.offsets["struct kmem_cache"]["random"]

    def has_type(self, name):
        return name in self.offsets

    def has_member(self, name, member):
        return member in self.offsets[name]

    def offsetof(self, name, member):
        return self.offsets[name][member]

    def layout(self, name, members):
        return {m: self.offsets[name][m] for m in members}


class FakeKernel:
    """Kernel memory made of whole pages (reads of unmapped pages fail), counting
    the reads."""

    def __init__(self, hardened: bool = True):
        self.pages: dict[int, bytearray] = {}
        self.symbols: dict[str, int] = {}
        self.types = FakeTypes(hardened)
        self.reads = 0

    def write(self, at: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.pages.setdefault((at + i) & ~4095, bytearray(4096))[(at + i) & 4095] = b

    def read(self, at: int, n: int) -> bytes:
        self.reads += 1
        out = bytearray()
        for a in range(at, at + n):
            if a & ~4095 not in self.pages:
                raise QemuleakError(f"unmapped {a:#x}")
            out.append(self.pages[a & ~4095][a & 4095])
        return bytes(out)

    def read_u64(self, at):
        return int.from_bytes(self.read(at, 8), "little")

    def read_u32(self, at):
        return int.from_bytes(self.read(at, 4), "little")

    def percpu_offset(self, cpu):
        return 0x10000 * cpu


CACHES = 0xFFFF888000100000
HEAD = 0xFFFFFFFF82000000                   # slab_caches


def kernel_with_caches(n: int, hardened: bool = True) -> FakeKernel:
    """`n` kmem_caches of 8 KiB each (the x86_64 size), on the slab_caches list,
    each with a node; two possible CPUs."""
    k = FakeKernel(hardened)
    off = FakeTypes.OFFSETS["struct kmem_cache"]
    k.symbols.update(slab_caches=HEAD, nr_node_ids=HEAD + 64, __cpu_possible_mask=HEAD + 72,
                     nr_cpu_ids=HEAD + 80)
    k.write(HEAD + 64, struct.pack("<I", 1))
    k.write(HEAD + 72, struct.pack("<Q", 0b11))
    k.write(HEAD + 80, struct.pack("<I", 2))
    addresses = [CACHES + 8408 * i for i in range(n)]
    links = [HEAD] + [a + off["list"] for a in addresses] + [HEAD]
    k.write(HEAD, struct.pack("<Q", links[1]))
    for i, a in enumerate(addresses):
        name = 0xFFFF888000300000 + 32 * i
        k.write(name, f"cache-{i}\0".encode())
        fields = {"cpu_slab": 0x3C000 + 32 * i, "flags": 0x10000 * (i % 2), "size": 64 + 8 * i,
                  "object_size": 60 + 8 * i, "offset": 32, "inuse": 64 + 8 * i, "red_left_pad": 0,
                  "name": name, "random": 0x1111 * (i + 1), "node": 0xFFFF888000400000 + 64 * i}
        for f, v in fields.items():             # random too: unread where the type lacks it
            k.write(a + off[f], struct.pack("<Q" if f in ("cpu_slab", "name", "random", "node") else "<I", v))
        k.write(a + off["list"], struct.pack("<Q", links[i + 2]))
    return k


@pytest.mark.parametrize("hardened", [False, True])
def test_caches_are_read_one_struct_and_one_name_at_a_time(hardened):
    k = kernel_with_caches(20, hardened)
    got = slub.caches(k)
    assert [c.name for c in got] == [f"cache-{i}" for i in range(20)]
    c = got[7]
    assert (c.address, c.size, c.object_size, c.offset, c.inuse, c.cpu_slab, c.nodes, c.flags) == \
        (CACHES + 8408 * 7, 120, 116, 32, 120, 0x3C000 + 32 * 7, (0xFFFF888000400000 + 64 * 7,), 0x10000)
    assert c.random == (0x1111 * 8 if hardened else None)
    # per page: each struct starts on its own page or two, the names share one
    assert k.reads < 2 * 20 + 5


def test_a_broken_cache_list_is_an_error():
    k = kernel_with_caches(3)
    k.write(CACHES + 8408 + 104, struct.pack("<Q", 0))
    with pytest.raises(QemuleakError, match="NULL link"):
        slub.caches(k)


def test_cpu_freelists_of_known_slabs():
    k = kernel_with_caches(3)
    cl = slub.caches(k)
    structs = np.array([0xFFFFEA0000001000, 0xFFFFEA0000002000], U64)
    slabs = Slabs(np.zeros(2, np.int64), np.zeros(2, U64), np.ones(2, np.int64), np.zeros(2, np.int64),
                  np.zeros(2, U64), structs, np.zeros(2, U64))
    # cpu 0: cache 0 on slab 1; cpu 1: cache 2 on slab 0, cache 1 on an unknown slab,
    # cache 0 with an empty freelist
    for cpu, i, head, slab in ((0, 0, 0xAA, structs[1]), (1, 2, 0xBB, structs[0]),
                               (1, 1, 0xCC, 0xFFFFEA0000009000), (1, 0, 0, structs[0])):
        k.write(cl[i].cpu_slab + 0x10000 * cpu, struct.pack("<QQQ", head, 0, int(slab)))
    for cpu in (0, 1):                               # the rest of each per-CPU area: empty
        for c in cl:
            at = c.cpu_slab + 0x10000 * cpu
            if at & ~4095 not in k.pages:
                k.write(at, bytes(24))
    heads, where = slub._cpu_freelists(k, slub._Memory(k), cl, slabs)
    assert heads.tolist() == [0xAA, 0xBB] and where.tolist() == [1, 0]


def test_partial_lists_take_links_from_the_slabs():
    k = kernel_with_caches(2)
    cl = slub.caches(k)
    link = 8
    structs = np.array([0xFFFFEA0000001000 + 64 * i for i in range(4)], U64)
    # cache 0's node: slabs 2 -> 0 -> an unknown entry -> head; cache 1's: empty
    node0 = cl[0].nodes[0] + 8
    unknown = 0xFFFFEA0000100000 + link
    nexts = np.zeros(4, U64)
    nexts[2], nexts[0] = structs[0] + U64(link), unknown
    k.write(node0, struct.pack("<Q", int(structs[2]) + link))
    k.write(unknown, struct.pack("<Q", node0))
    k.write(cl[1].nodes[0] + 8, struct.pack("<Q", cl[1].nodes[0] + 8))
    slabs = Slabs(np.zeros(4, np.int64), np.zeros(4, U64), np.array([10, 10, 10, 10]),
                  np.array([7, 1, 4, 0]), np.zeros(4, U64), structs, nexts)
    assert slub._partial_free(k, slub._Memory(k), cl, slabs).tolist() == [3 + 6, 0]
