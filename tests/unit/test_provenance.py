"""Which probes tracks mode sets: none in a slab fast path's code page but while
a module initializes. The real kernels' choices are checked on real guests
(tests/guest/test_scan.py, test_workflows.py); these cover the rule itself."""

import pytest

from qemuleak import provenance
from qemuleak.errors import QemuleakError
from qemuleak.kernel.symbols import Symbol


class Symbols:
    def __init__(self, table: dict[str, tuple[int, int]]):
        self.table = table

    def get(self, name):
        return self.table[name][0] if name in self.table else None

    def lookup(self, address):
        for name, (at, size) in self.table.items():
            if at <= address < at + size:
                return Symbol(name, at, size)
        return None


class Kernel:
    def __init__(self, **symbols):
        self.symbols = Symbols(symbols)


PAGE = 4096
BASE = 0xFFFFFFFF81000000


def names(probes):
    return sorted(p.name for p in probes)


def test_cold_pages_get_their_probes_always():
    k = Kernel(kfree=(BASE, 0x100), __vmalloc_node_range=(BASE + 10 * PAGE, 0x800),
               vfree=(BASE + 11 * PAGE, 0x80), kmalloc_large=(BASE + 20 * PAGE, 0x80),
               free_large_kmalloc=(BASE + 21 * PAGE, 0x80), krealloc=(BASE + 22 * PAGE, 0x80),
               kmem_cache_create=(BASE + 23 * PAGE, 0x40),
               kmem_cache_create_usercopy=(BASE + 23 * PAGE + 0x40, 0x200),
               do_init_module=(BASE + 30 * PAGE, 0x100), do_exit=(BASE + 31 * PAGE, 0x100))
    t = provenance.tracks_probes(k)
    assert names(t.probes) == ["__vmalloc_node_range", "do_exit", "do_init_module",
                               "free_large_kmalloc", "kmalloc_large", "kmem_cache_create",
                               "kmem_cache_create_usercopy", "krealloc", "vfree"]
    assert t.init_probes == () and t.lost == []


def test_a_probe_in_a_hot_page_is_set_only_during_module_init():
    # Debian 6.1 x86_64's layout: kmalloc_large in __kmalloc's page, the cache
    # creation functions and free_large_kmalloc in kfree's (which spans two pages)
    k = Kernel(kfree=(BASE + PAGE - 0x80, 0x110), __kmalloc=(BASE + 2 * PAGE, 0x150),
               kmalloc_large=(BASE + 2 * PAGE + 0x150, 0xa0),
               free_large_kmalloc=(BASE + PAGE + 0x20, 0x70),
               kmem_cache_create=(BASE + 0x300, 0x20),
               kmem_cache_create_usercopy=(BASE + 0x30, 0x2e0),
               __vmalloc_node_range=(BASE + 10 * PAGE, 0x800), vfree=(BASE + 10 * PAGE + 0x900, 0x80),
               do_init_module=(BASE + 30 * PAGE, 0x100))
    t = provenance.tracks_probes(k)
    assert names(t.probes) == ["__vmalloc_node_range", "do_init_module", "vfree"]
    assert names(t.init_probes) == ["free_large_kmalloc", "kmalloc_large", "kmem_cache_create",
                                    "kmem_cache_create_usercopy"]
    assert len(t.lost) == 2 and all("after its init" in x or "after a module's init" in x
                                    for x in t.lost)
    line = provenance.describe("breakpoints", k, list(t.probes))
    assert "slub_debug=U,kmalloc-*" in line


def test_the_newest_cache_creation_entry_is_preferred():
    k = Kernel(__kmem_cache_create_args=(BASE + 5 * PAGE, 0x300),
               kmem_cache_create_usercopy=(BASE + 6 * PAGE, 0x100), kfree=(BASE, 0x100))
    t = provenance.tracks_probes(k)
    assert names(t.probes) == ["__kmem_cache_create_args"]


def test_explicit_tracks_on_a_guest_without_them_is_an_error(monkeypatch):
    monkeypatch.setattr(provenance, "tracked_caches", lambda kernel: ["dentry"])
    assert provenance.choose(None, "auto") == "breakpoints"
    with pytest.raises(QemuleakError, match="slub_debug"):
        provenance.choose(None, "tracks")
    monkeypatch.setattr(provenance, "tracked_caches", lambda kernel: ["kmalloc-64"])
    assert provenance.choose(None, "auto") == "tracks"
    assert provenance.choose(None, "breakpoints") == "breakpoints"
    with pytest.raises(QemuleakError):
        provenance.choose(None, "fast")
