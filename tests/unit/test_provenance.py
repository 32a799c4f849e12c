"""Which probes tracks mode sets: module loads always, the rest while a module
initializes. The real kernels' choices are checked on real guests
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


def test_only_module_loads_are_always_traced(monkeypatch):
    # every breakpoint hit costs the guest a flush of all its translated code
    k = Kernel(kfree=(BASE, 0x100), __vmalloc_node_range=(BASE + 10 * PAGE, 0x800),
               vfree=(BASE + 11 * PAGE, 0x80), kmalloc_large=(BASE + 20 * PAGE, 0x80),
               free_large_kmalloc=(BASE + 21 * PAGE, 0x80), krealloc=(BASE + 22 * PAGE, 0x80),
               kmem_cache_create=(BASE + 23 * PAGE, 0x40),
               kmem_cache_create_usercopy=(BASE + 23 * PAGE + 0x40, 0x200),
               pcpu_alloc=(BASE + 24 * PAGE, 0x400), free_percpu=(BASE + 25 * PAGE, 0x100),
               do_init_module=(BASE + 30 * PAGE, 0x100), do_exit=(BASE + 31 * PAGE, 0x100))
    t = provenance.tracks_probes(k)
    assert names(t.probes) == ["do_init_module"]
    assert names(t.init_probes) == ["__vmalloc_node_range", "free_large_kmalloc", "free_percpu",
                                    "kmalloc_large", "kmem_cache_create",
                                    "kmem_cache_create_usercopy", "krealloc", "pcpu_alloc",
                                    "vfree"]
    assert len(t.lost) == 5
    monkeypatch.setattr(provenance, "tracked_caches", lambda kernel: ["kmalloc-64"])
    line = provenance.describe("tracks", k, list(t.probes), t.lost)
    assert "1 breakpoint (do_init_module)" in line and "vmalloc's caller" in line
    line = provenance.describe("breakpoints", k, list(t.probes))
    assert "slub_debug=U,kmalloc-*" in line


def test_what_a_kernel_lacks_is_left_out():
    k = Kernel(do_init_module=(BASE, 0x100), vfree=(BASE + PAGE, 0x80))
    t = provenance.tracks_probes(k)
    assert names(t.probes) == ["do_init_module"]
    assert names(t.init_probes) == ["vfree"] and len(t.lost) == 1


def test_the_newest_cache_creation_entry_is_preferred():
    k = Kernel(__kmem_cache_create_args=(BASE + 5 * PAGE, 0x300),
               kmem_cache_create_usercopy=(BASE + 6 * PAGE, 0x100), kfree=(BASE, 0x100))
    t = provenance.tracks_probes(k)
    assert names(t.init_probes) == ["__kmem_cache_create_args"]


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
