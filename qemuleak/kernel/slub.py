"""SLUB inventory: every allocated object of every slab cache, read from guest
memory with no tracing (the way drgn's slab helpers see it, vectorized).

A slab is found from its `struct slab` (or `struct page`) in the vmemmap: a page
that is no tail page and whose `slab_cache` is one of the caches on `slab_caches`.
Its objects sit every `s->size` bytes from its first byte plus `s->red_left_pad`;
the free ones are on the slab's own freelist and, for a CPU's active slab, on that
CPU's lockless `kmem_cache_cpu.freelist`. With CONFIG_SLAB_FREELIST_HARDENED (a
`random` field in `struct kmem_cache`) a free object's next pointer is stored as
`next ^ s->random ^ swab(&next)`. Every decoded pointer must land on an object
slot of the same slab; one that does not (a guest stopped mid-update, or memory
reused) ends that chain and names the cache in `Inventory.broken`: its remaining
free objects then count as allocated, which can hide a leak but never invents one.
"""

from dataclasses import dataclass, field

import numpy as np

from ..errors import QemuleakError
from . import mm, percpu
from .lists import list_nodes

U64 = np.uint64
SLAB_STORE_USER = 0x00010000


@dataclass(frozen=True)
class Cache:
    """One `struct kmem_cache`: what the inventory needs of it."""

    address: int
    name: str
    size: int                  # object stride in the slab (metadata included)
    object_size: int           # what callers asked for, at most
    offset: int                # where a free object keeps its next pointer
    random: int | None         # freelist hardening key, None when not hardened
    red_left_pad: int
    cpu_slab: int              # per-CPU pointer to its kmem_cache_cpu
    nodes: tuple[int, ...]     # its kmem_cache_node of each NUMA node
    flags: int = 0             # slab_flags_t
    inuse: int = 0             # where the metadata after an object starts

    @property
    def tracks(self) -> int | None:
        """Offset from an object to its allocation `struct track`, None unless the
        cache stores them (SLAB_STORE_USER: boot with slub_debug=U)."""
        if not self.flags & SLAB_STORE_USER:
            return None
        outside = self.offset >= self.inuse          # the free pointer sits after the object
        return self.inuse + 8 if outside else self.inuse


def caches(kernel) -> list[Cache]:
    """Every cache on the `slab_caches` list."""
    t = kernel.types
    head = kernel.symbols.get("slab_caches")
    if head is None:
        raise QemuleakError("no slab_caches symbol: the kernel's slab caches are unknown",
                            "pass --vmlinux or --system-map")
    k = "struct kmem_cache"
    off = t.layout(k, ["list", "size", "object_size", "offset", "name", "cpu_slab", "node",
                       "flags", "inuse"])
    random = t.offsetof(k, "random") if t.has_member(k, "random") else None
    red = t.offsetof(k, "red_left_pad") if t.has_member(k, "red_left_pad") else None
    ids = kernel.symbols.get("nr_node_ids")
    nodes = kernel.read_u32(ids) if ids is not None else 1
    out = []
    for node in list_nodes(kernel, head, limit=1 << 16):
        s = node - off["list"]
        name = kernel.read(kernel.read_u64(s + off["name"]), 64).split(b"\0", 1)[0]
        out.append(Cache(
            s, name.decode("utf-8", "replace"), kernel.read_u32(s + off["size"]),
            kernel.read_u32(s + off["object_size"]), kernel.read_u32(s + off["offset"]),
            kernel.read_u64(s + random) if random is not None else None,
            kernel.read_u32(s + red) if red is not None else 0,
            kernel.read_u64(s + off["cpu_slab"]),
            tuple(n for n in (kernel.read_u64(s + off["node"] + 8 * i) for i in range(nodes)) if n),
            kernel.read_u32(s + off["flags"]), kernel.read_u32(s + off["inuse"])))
    return out


@dataclass
class Slabs:
    """Every slab: its cache (index into the cache list), first object's address,
    object count, in-use count, freelist head and `struct slab` address."""

    cache: np.ndarray
    base: np.ndarray
    objects: np.ndarray
    inuse: np.ndarray
    freelist: np.ndarray
    struct: np.ndarray


@dataclass
class Inventory:
    """Every allocated slab object, in address order, and how the count came out."""

    caches: list[Cache]
    addresses: np.ndarray              # uint64
    cache: np.ndarray                  # index into `caches`, per object
    slab_pages: list[np.ndarray]       # per RAM range, a bool per page: part of a slab
    slots: np.ndarray                  # per cache: object slots in all its slabs
    free: np.ndarray                   # per cache: free objects found
    partial_free: np.ndarray           # per cache: free objects of slabs on node partial lists
    broken: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> np.ndarray:
        """Each object's size: its cache's object_size."""
        sizes = np.array([c.object_size for c in self.caches], np.int64)
        return sizes[self.cache]


def _bits(words: np.ndarray, where: tuple[int, int], base_bit: int) -> np.ndarray:
    bit, width = where
    return ((words >> U64(bit - base_bit)) & U64((1 << width) - 1)).astype(np.int64)


def _slabs(kernel, pages: mm.Pages, cache_list: list[Cache], linear: int) -> tuple[Slabs, list]:
    """Every slab page of a known cache, from the struct pages."""
    t = kernel.types
    kind = "struct slab" if t.has_type("struct slab") else "struct page"
    fl = t.offsetof(kind, "freelist")
    objects_bits, inuse_bits = t.member_bits(kind, "objects"), t.member_bits(kind, "inuse")
    word = min(objects_bits[0], inuse_bits[0]) // 64 * 64        # the `counters` word
    known = np.array(sorted(c.address for c in cache_list), U64)
    index_of = {c.address: i for i, c in enumerate(cache_list)}
    order = np.array([index_of[int(a)] for a in known], np.int64)
    parts, masks = [], []
    for r, raw in zip(pages.ranges, pages.raw):
        cache = pages.field(raw, pages.cache_offset, "<u8")
        k = np.minimum(np.searchsorted(known, cache), len(known) - 1)
        tail, hidx, ok = pages.heads(r, raw)
        head = (known[k] == cache) & ~tail
        mask = head.copy()                        # a slab's tail pages are slab too
        mask[np.flatnonzero(tail)[ok]] = head[hidx[ok]]
        masks.append(mask)
        i = np.flatnonzero(head)
        counters = pages.field(raw[i], word // 8, "<u8")
        pfn = U64(r.gpa // mm.PAGE) + i.astype(U64)
        parts.append(Slabs(order[k[i]], pfn * U64(mm.PAGE) + U64(linear),
                           _bits(counters, objects_bits, word), _bits(counters, inuse_bits, word),
                           pages.field(raw[i], fl, "<u8"),
                           U64(pages.base) + pfn * U64(pages.size)))
    return Slabs(*(np.concatenate([getattr(p, f) for p in parts])
                   for f in ("cache", "base", "objects", "inuse", "freelist", "struct"))), masks


class _Reader:
    """Vectorized u64 reads of direct-mapped kernel addresses from a RAM copy."""

    def __init__(self, ram, linear: int):
        self.ram, self.linear = ram, U64(linear)
        self.lo = np.array([r.gpa for r in ram.ranges], U64)
        self.hi = np.array([r.end for r in ram.ranges], U64)

    def u64(self, va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, readable) for each address."""
        gpa = va - self.linear
        ok = ((gpa[:, None] >= self.lo) & (gpa[:, None] + U64(8) <= self.hi)).any(axis=1)
        values = np.zeros(len(va), U64)
        if ok.any():
            off = self.ram.offsets(gpa[ok])
            values[ok] = self.ram.data[off[:, None] + np.arange(8)].copy().view("<u8").reshape(-1)
        return values, ok


def _walk_freelists(reader: _Reader, heads: np.ndarray, slab: np.ndarray, slabs: Slabs,
                    cache_list: list[Cache]) -> tuple[np.ndarray, np.ndarray]:
    """(free object addresses, slab index of chains that broke): all the chains
    starting at `heads` (0 = empty), chain i in slab `slab[i]`, walked together."""
    size = np.array([c.size for c in cache_list], U64)[slabs.cache]
    offset = np.array([c.offset for c in cache_list], U64)[slabs.cache]
    red = np.array([c.red_left_pad for c in cache_list], U64)[slabs.cache]
    hardened = np.array([c.random is not None for c in cache_list])[slabs.cache]
    random = np.array([c.random or 0 for c in cache_list], U64)[slabs.cache]
    start = slabs.base + red
    end = start + slabs.objects.astype(U64) * size

    def on_slot(p, s):
        inside = (p >= start[s]) & (p < end[s])
        return inside & ((p - start[s]) % np.where(inside, size[s], U64(1)) == 0)

    cur, chain = heads.astype(U64), slab.astype(np.int64)
    ok = on_slot(cur, chain)
    broken = [chain[(cur != 0) & ~ok]]
    cur, chain = cur[ok], chain[ok]
    found = []
    for _ in range(int(slabs.objects.max(initial=0)) + 1):
        if not len(cur):
            break
        found.append(cur)
        at = cur + offset[chain]
        raw, readable = reader.u64(at)
        nxt = np.where(hardened[chain], raw ^ random[chain] ^ at.byteswap(), raw)
        good = readable & on_slot(nxt, chain)
        broken.append(chain[(nxt != 0) & ~good])
        cur, chain = nxt[good], chain[good]
    if len(cur):                              # longer than the slab: a cycle
        broken.append(chain)
    return (np.concatenate(found) if found else np.zeros(0, U64)), np.concatenate(broken)


def _cpu_freelists(kernel, cache_list: list[Cache], slabs: Slabs) -> tuple[np.ndarray, np.ndarray]:
    """(freelist head, slab index) of each CPU's active slab of each cache."""
    t = kernel.types
    c = "struct kmem_cache_cpu"
    fl = t.offsetof(c, "freelist")
    sl = t.offsetof(c, "slab") if t.has_member(c, "slab") else t.offsetof(c, "page")
    order = np.argsort(slabs.struct)
    heads, where = [], []
    for cpu in percpu.possible_cpus(kernel):
        off = kernel.percpu_offset(cpu)
        for cache in cache_list:
            at = (cache.cpu_slab + off) & (2**64 - 1)
            head, slab = kernel.read_u64(at + fl), kernel.read_u64(at + sl)
            if not head or not slab:
                continue
            k = np.searchsorted(slabs.struct, U64(slab), sorter=order)
            if k < len(order) and int(slabs.struct[order[k]]) == slab:
                heads.append(head)
                where.append(int(order[k]))
    return np.array(heads, U64), np.array(where, np.int64)


def _partial_free(kernel, cache_list: list[Cache], slabs: Slabs) -> np.ndarray:
    """Per cache, the free objects of the slabs on its nodes' partial lists (what
    /proc/slabinfo counts as free)."""
    t = kernel.types
    kind = "struct slab" if t.has_type("struct slab") else "struct page"
    link = t.offsetof(kind, "slab_list")
    partial = t.offsetof("struct kmem_cache_node", "partial")
    free = {int(s): int(o - u) for s, o, u in zip(slabs.struct, slabs.objects, slabs.inuse)}
    out = np.zeros(len(cache_list), np.int64)
    for i, cache in enumerate(cache_list):
        for node in cache.nodes:
            for entry in list_nodes(kernel, node + partial):
                out[i] += free.get(entry - link, 0)
    return out


def inventory(kernel, ram, pages: mm.Pages | None = None) -> Inventory:
    """Every allocated slab object in the frozen guest (`ram` is the snapshot's
    copy, and the kernel must read from it: see snapshot.guest_frozen)."""
    linear = kernel.guest.arch.linear_offset(kernel)
    if linear is None:
        raise QemuleakError("cannot find where the kernel maps RAM (its linear map)",
                            "pass --vmlinux or --system-map")
    pages = pages or mm.Pages(kernel, ram.ranges)
    cache_list = caches(kernel)
    slabs, masks = _slabs(kernel, pages, cache_list, linear)
    reader = _Reader(ram, linear)
    cpu_heads, cpu_slabs = _cpu_freelists(kernel, cache_list, slabs)
    heads = np.concatenate([slabs.freelist, cpu_heads])
    owner = np.concatenate([np.arange(len(slabs.base)), cpu_slabs])
    free, broken = _walk_freelists(reader, heads, owner, slabs, cache_list)
    size = np.array([c.size for c in cache_list], U64)[slabs.cache]
    red = np.array([c.red_left_pad for c in cache_list], U64)[slabs.cache]
    n = slabs.objects
    slab_of = np.repeat(np.arange(len(n)), n)
    first = np.concatenate(([0], np.cumsum(n)[:-1])) if len(n) else n
    slot = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
    objects = slabs.base[slab_of] + red[slab_of] + slot.astype(U64) * size[slab_of]
    order = np.argsort(objects)
    objects, slab_of = objects[order], slab_of[order]
    free = np.unique(free)
    allocated = ~np.isin(objects, free, assume_unique=True)
    cache = slabs.cache[slab_of]
    count = lambda where: np.bincount(cache[where], minlength=len(cache_list))  # noqa: E731
    return Inventory(cache_list, objects[allocated], cache[allocated], masks,
                     count(np.ones(len(cache), bool)), count(~allocated),
                     _partial_free(kernel, cache_list, slabs),
                     sorted({cache_list[int(slabs.cache[s])].name for s in broken.tolist()}))


@dataclass
class Tracks:
    """SLUB's record of who allocated each object (slub_debug=U), per object of an
    inventory: caller, stack depot handle, cpu, pid, jiffies. `stored` is False
    where the cache keeps no tracks."""

    stored: np.ndarray
    caller: np.ndarray
    handle: np.ndarray
    cpu: np.ndarray
    pid: np.ndarray
    when: np.ndarray


def alloc_tracks(kernel, ram, inv: Inventory) -> Tracks:
    """The allocation track of every object in `inv`, read from the RAM copy."""
    t = kernel.types
    off = t.layout("struct track", ["addr", "cpu", "pid", "when"])
    handle = t.offsetof("struct track", "handle") if t.has_member("struct track", "handle") else None
    where = np.array([c.tracks if c.tracks is not None else -1 for c in inv.caches], np.int64)[inv.cache]
    stored = where >= 0
    reader = _Reader(ram, kernel.guest.arch.linear_offset(kernel))
    track = inv.addresses + np.where(stored, where, 0).astype(U64)

    def word(o: int | None, bits: int = 64) -> np.ndarray:
        if o is None:
            return np.zeros(len(track), U64)
        values, ok = reader.u64(track + U64(o))
        values = np.where(ok & stored, values, U64(0))
        return values & U64((1 << bits) - 1) if bits < 64 else values
    return Tracks(stored & (word(off["addr"]) != 0), word(off["addr"]), word(handle, 32),
                  word(off["cpu"], 32).astype(np.int64), word(off["pid"], 32).astype(np.int64),
                  word(off["when"]))
