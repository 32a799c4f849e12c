"""Unit tests for qemuleak.scan._gone: which tracked objects the snapshot's
allocators hold free (freed while the tracer was not looking). Real guests: see
tests/guest/test_scan.py::test_objects_freed_while_not_tracing_are_not_reported."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from qemuleak.kernel.vmalloc import VmapArea
from qemuleak.objects import Kind
from qemuleak.scan import _gone

LINEAR = 0xFFFF_8880_0000_0000          # virtual = physical + LINEAR
CACHE = 0xFFFF_8880_0100_0000          # a kmem_cache
U64 = np.uint64


class Pages:
    """mm.Pages as _gone asks it: a slab cache and a free bit per 4 KiB page."""

    def __init__(self, slab: dict[int, int], free: set[int]):
        self.slab, self.free = slab, free

    def slab_cache(self, gpas):
        return np.array([self.slab.get(int(g) >> 12, 0) for g in gpas], U64)

    def free_at(self, gpas):
        return np.array([int(g) >> 12 in self.free for g in gpas], bool)


def kernel(linear=LINEAR):
    return SimpleNamespace(guest=SimpleNamespace(arch=SimpleNamespace(
        linear_offset=lambda _kernel: linear)))


def va(gpa: int) -> int:
    return LINEAR + gpa


def test_each_allocator_decides_for_its_own_objects():
    # slab page 0x10: slots at 0x10000 (allocated), 0x10040 (free); 0x10100 is
    # no slot (a KFENCE object sits where the geometry puts none): kept.
    # page 0x20: a page allocation, now free; page 0x30: one still in use;
    # page 0x40: a destroyed cache's page, back in the page allocator.
    pages = Pages({0x10: CACHE}, {0x20, 0x40})
    inv = SimpleNamespace(free_objects=np.array([va(0x10040)], U64))
    busy = [VmapArea(0xFFFF_C900_0000_0000, 0xFFFF_C900_0000_3000, 0, 0, 0, 0)]
    chunks = SimpleNamespace(cookies=lambda: np.array([0x34000], U64))
    objects = [
        (va(0x10000), Kind.KMALLOC, False),
        (va(0x10040), Kind.CACHE, True),
        (va(0x10100), Kind.KMALLOC, False),
        (va(0x20000), Kind.PAGE, True),
        (va(0x30000), Kind.PAGE, False),
        (va(0x40080), Kind.CACHE, True),
        (0xFFFF_C900_0000_0000, Kind.VMALLOC, False),
        (0xFFFF_C900_0001_0000, Kind.VMALLOC, True),
        (0x34000, Kind.PERCPU, False),
        (0x34040, Kind.PERCPU, True),
        (va(0x20000), Kind.MEMBLOCK, False),        # no allocator to ask: kept
    ]
    addresses = np.array([a for a, _, _ in objects], U64)
    kinds = np.array([int(k) for _, k, _ in objects])
    got = _gone(kernel(), pages, inv, busy, chunks, addresses, kinds)
    assert got.tolist() == [g for _, _, g in objects]


def test_unknown_allocators_free_nothing():
    pages = Pages({0x10: CACHE}, set())
    addresses = np.array([va(0x10040), 0xFFFF_C900_0001_0000, 0x34040], U64)
    kinds = np.array([int(Kind.CACHE), int(Kind.VMALLOC), int(Kind.PERCPU)])
    assert not _gone(kernel(), pages, None, None, None, addresses, kinds).any()
    # without the linear map nothing in it can be looked up
    inv = SimpleNamespace(free_objects=np.array([va(0x10040)], U64))
    assert not _gone(kernel(None), pages, inv, None, None, addresses[:1], kinds[:1]).any()
