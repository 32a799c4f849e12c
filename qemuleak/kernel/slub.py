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

from dataclasses import dataclass, field, fields

import numpy as np

from ..errors import QemuleakError
from . import mm, percpu
from .lists import list_nodes

U64 = np.uint64
SLAB_STORE_USER = 0x00010000
SLAB_KMALLOC = 0x00001000
MASK = 2**64 - 1
PAGE_MASK = 4095


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
    store_user: int = SLAB_STORE_USER   # this kernel's SLAB_STORE_USER (see slab_flag)
    kmalloc_flag: int = SLAB_KMALLOC    # this kernel's SLAB_KMALLOC

    @property
    def tracks(self) -> int | None:
        """Offset from an object to its allocation `struct track`, None unless the
        cache stores them (SLAB_STORE_USER: boot with slub_debug=U)."""
        if not self.flags & self.store_user:
            return None
        outside = self.offset >= self.inuse          # the free pointer sits after the object
        return self.inuse + 8 if outside else self.inuse

    @property
    def keeps_requested_size(self) -> bool:
        """A kmalloc cache with tracks stores the size kmalloc was asked for after
        its two tracks (6.1: "mm/slub: store kmalloc's original request size")."""
        return self.tracks is not None and self.is_kmalloc

    @property
    def is_kmalloc(self) -> bool:
        """One of kmalloc's caches (SLAB_KMALLOC, as this kernel numbers it)."""
        return bool(self.flags & self.kmalloc_flag)


def _word(raw: bytes, at: int = 0, width: int = 8) -> int:
    """The little-endian unsigned integer of `width` bytes at `at` in `raw`."""
    return int.from_bytes(raw[at:at + width], "little")


class _Memory:
    """Kernel memory read a whole 4 KiB page at a time, each page once: the structs
    read here sit packed in few pages (caches, their per-CPU and per-node parts,
    their names), and each read through the page tables costs more than the copy."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.pages: dict[int, bytes] = {}

    def _page(self, base: int) -> bytes:
        page = self.pages.get(base)
        if page is None:
            page = self.pages[base] = self.kernel.read(base, PAGE_MASK + 1)
        return page

    def read(self, va: int, size: int) -> bytes:
        at = va & PAGE_MASK
        if 0 < size <= PAGE_MASK + 1 - at:          # most reads: inside one page
            return self._page(va - at)[at:at + size]
        parts = []
        while size > 0:
            at = va & PAGE_MASK
            n = min(size, PAGE_MASK + 1 - at)
            parts.append(self._page(va - at)[at:at + n])
            va, size = va + n, size - n
        return b"".join(parts)

    def u64(self, va: int) -> int:
        return _word(self.read(va, 8))


def slab_flag(kernel, name: str) -> int:
    """The value of slab flag `name` ("SLAB_STORE_USER", "SLAB_KMALLOC") in this
    kernel. 6.9 ("mm, slab: use an enum to define SLAB_ cache creation flags")
    renumbered them: their bit numbers are the enumerators `_<name>` of
    `enum _slab_flag_bits`; before, they are the fixed values of <linux/slab.h>."""
    t = kernel.types
    value = t.enumerator("enum _slab_flag_bits", "_" + name) \
        if t.has_type("enum _slab_flag_bits") else None
    return 1 << value if value is not None else _OLD_SLAB_FLAGS[name]


_OLD_SLAB_FLAGS = {"SLAB_STORE_USER": SLAB_STORE_USER, "SLAB_KMALLOC": 0x00001000}


def caches(kernel, memory: _Memory | None = None) -> list[Cache]:
    """Every cache on the `slab_caches` list (read through `memory` when given)."""
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
    memory = memory or _Memory(kernel)
    store_user = slab_flag(kernel, "SLAB_STORE_USER")
    kmalloc_flag = slab_flag(kernel, "SLAB_KMALLOC")
    ends = [o + 8 for o in off.values()] + [off["node"] + 8 * nodes]
    ends += [random + 8] if random is not None else []
    ends += [red + 4] if red is not None else []
    out = []
    for node in list_nodes(kernel, head, 1 << 16, memory.u64):
        s = node - off["list"]
        raw = memory.read(s, max(ends))             # from its start to its last field used
        name = memory.read(_word(raw, off["name"]), 64).split(b"\0", 1)[0]
        out.append(Cache(
            s, name.decode("utf-8", "replace"), _word(raw, off["size"], 4),
            _word(raw, off["object_size"], 4), _word(raw, off["offset"], 4),
            _word(raw, random) if random is not None else None,
            _word(raw, red, 4) if red is not None else 0, _word(raw, off["cpu_slab"]),
            tuple(n for n in (_word(raw, off["node"] + 8 * i) for i in range(nodes)) if n),
            _word(raw, off["flags"], 4), _word(raw, off["inuse"], 4), store_user,
            kmalloc_flag))
    return out


@dataclass
class Slabs:
    """Every slab: its cache (index into the cache list), first object's address,
    object count, in-use count, freelist head, `struct slab` address and the next
    link of its `slab_list`."""

    cache: np.ndarray
    base: np.ndarray
    objects: np.ndarray
    inuse: np.ndarray
    freelist: np.ndarray
    struct: np.ndarray
    link: np.ndarray


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
    free_objects: np.ndarray = field(default=None, repr=False)   # uint64, in address order
    free_cache: np.ndarray = field(default=None, repr=False)     # index into `caches`, per free object

    def free_of(self, name: str) -> tuple["Cache | None", np.ndarray]:
        """The cache called `name` (None if there is none: merged into another) and
        its free objects' addresses."""
        for i, c in enumerate(self.caches):
            if c.name == name:
                return c, self.free_objects[self.free_cache == i]
        return None, np.zeros(0, U64)

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
    fl, link = t.offsetof(kind, "freelist"), t.offsetof(kind, "slab_list")
    objects_bits, inuse_bits = t.member_bits(kind, "objects"), t.member_bits(kind, "inuse")
    word = min(objects_bits[0], inuse_bits[0]) // 64 * 64        # the `counters` word
    known = np.array(sorted(c.address for c in cache_list), U64)
    index_of = {c.address: i for i, c in enumerate(cache_list)}
    order = np.array([index_of[int(a)] for a in known], np.int64)
    parts, masks = [], []
    for r, raw in zip(pages.ranges, pages.raw):
        cache = pages.field(raw, pages.cache_offset, "<u8")
        # most pages hold no cache address: search only those that might
        maybe = np.flatnonzero((cache >= known[0]) & (cache <= known[-1]))
        k = np.searchsorted(known, cache[maybe])
        tail, hidx, ok = pages.heads(r, raw)
        hit = (known[k] == cache[maybe]) & ~tail[maybe]
        i, k = maybe[hit], k[hit]
        head = np.zeros(len(raw), bool)
        head[i] = True
        mask = head.copy()                        # a slab's tail pages are slab too
        mask[np.flatnonzero(tail)[ok]] = head[hidx[ok]]
        masks.append(mask)
        rows = raw[i]
        counters = pages.field(rows, word // 8, "<u8")
        pfn = U64(r.gpa // mm.PAGE) + i.astype(U64)
        parts.append(Slabs(order[k], pfn * U64(mm.PAGE) + U64(linear),
                           _bits(counters, objects_bits, word), _bits(counters, inuse_bits, word),
                           pages.field(rows, fl, "<u8"), U64(pages.base) + pfn * U64(pages.size),
                           pages.field(rows, link, "<u8")))
    return Slabs(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Slabs))), masks


class _Reader:
    """Vectorized u64 reads of direct-mapped kernel addresses from a RAM copy."""

    def __init__(self, ram, linear: int):
        self.ram, self.linear = ram, U64(linear)
        self.lo = np.array([r.gpa for r in ram.ranges], U64)
        self.hi = np.array([r.end for r in ram.ranges], U64)
        data = ram.data
        whole = data.ndim == 1 and data.flags.c_contiguous
        self.words = data[:len(data) // 8 * 8].view("<u8") if whole else None

    def u64(self, va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, readable) for each address."""
        gpa = va - self.linear
        ok = ((gpa[:, None] >= self.lo) & (gpa[:, None] + U64(8) <= self.hi)).any(axis=1)
        values = np.zeros(len(va), U64)
        if ok.any():
            values[ok] = self._gather(self.ram.offsets(gpa[ok]))
        return values, ok

    def _gather(self, off: np.ndarray) -> np.ndarray:
        """The u64 at each offset of the RAM copy: one word gather when all are
        8-aligned (SLUB's free pointers are), else byte by byte."""
        if self.words is not None and not (off & 7).any():
            return self.words[off >> 3]
        return self.ram.data[off[:, None] + np.arange(8)].copy().view("<u8").reshape(-1)


@dataclass
class _Geometry:
    """Where the object slots of each slab lie: the first at `start`, every `size`
    bytes up to `end`; a free slot's next pointer `offset` bytes into it."""

    start: np.ndarray
    end: np.ndarray
    size: np.ndarray
    offset: np.ndarray
    hardened: np.ndarray
    random: np.ndarray

    @classmethod
    def of(cls, slabs: Slabs, cache_list: list[Cache]) -> "_Geometry":
        def per_slab(values: list, dtype) -> np.ndarray:
            return np.array(values, dtype)[slabs.cache]
        size = per_slab([c.size for c in cache_list], U64)
        start = slabs.base + per_slab([c.red_left_pad for c in cache_list], U64)
        return cls(start, start + slabs.objects.astype(U64) * size, size,
                   per_slab([c.offset for c in cache_list], U64),
                   per_slab([c.random is not None for c in cache_list], bool),
                   per_slab([c.random or 0 for c in cache_list], U64))

    def slot(self, p: np.ndarray, s: np.ndarray) -> np.ndarray:
        """The slot number of address `p` in slab `s`, -1 where it is no slot."""
        inside = (p >= self.start[s]) & (p < self.end[s])
        rel = np.where(inside, p - self.start[s], U64(0))
        size = np.where(inside, self.size[s], U64(1))
        ok = inside & (rel % size == 0)
        return np.where(ok, (rel // size).astype(np.int64), -1)


def _walk_freelists(reader: _Reader, heads: np.ndarray, slab: np.ndarray, slabs: Slabs,
                    cache_list: list[Cache]) -> tuple[np.ndarray, np.ndarray]:
    """(free object addresses, slab index of chains that broke): all the chains
    starting at `heads` (0 = empty), chain i in slab `slab[i]`.

    Each slot of the slabs with a chain gets its successor at once (its decoded
    next pointer as a slot number, or an end: fine or broken); the chains are then
    followed by pointer doubling, log2(objects) passes over all those slots. A chain
    breaks where it meets a pointer that is no slot of its slab, or a cycle; two
    chains that merge are both followed, and not broken."""
    geo = _Geometry.of(slabs, cache_list)
    heads, slab = heads.astype(U64), slab.astype(np.int64)
    first = geo.slot(heads, slab)
    broken = slab[(heads != 0) & (first < 0)]
    slab, first = slab[first >= 0], first[first >= 0]
    if not len(slab):
        return np.zeros(0, U64), broken
    table = _unique(slab)
    owner, slot, start = _slot_table(slabs, table)
    address = geo.start[owner] + slot.astype(U64) * geo.size[owner]
    succ = _successors(reader, geo, address, owner, start)
    fine, bad = len(address), len(address) + 1            # the two ends, each its own successor
    jump = np.concatenate([succ, [fine, bad]])
    reached = np.zeros(len(jump), bool)
    reached[start[slab] + first] = True
    span = 1                                # jump = successor^span; reached: < span steps from a head
    longest = int(slabs.objects[table].max())
    while span < longest:
        reached[jump[np.flatnonzero(reached)]] = True
        jump = jump[jump]
        span *= 2
    # `span` steps reach the end of any chain without a cycle
    ends = jump[start[slab] + first]
    return address[reached[:fine]], np.concatenate([broken, slab[ends != fine]])


def _slot_table(slabs: Slabs, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every object slot of the slabs `table` (sorted slab indices): the slab
    index and slot number of each, and where each slab's slots start in the
    table, indexed by slab index."""
    owner, slot, first = _slots(slabs.objects[table])
    start = np.zeros(len(slabs.objects), np.int64)
    start[table] = first
    return table[owner], slot, start


def _successors(reader: _Reader, geo: _Geometry, address: np.ndarray, owner: np.ndarray,
                start: np.ndarray) -> np.ndarray:
    """Where the next pointer of each slot (at `address`, in slab `owner`) leads, as
    a table index: a slot of the same slab; len(address) = the chain ends (NULL, or
    an unreadable word that decodes to NULL); len(address) + 1 = the chain breaks."""
    at = address + geo.offset[owner]
    raw, readable = reader.u64(at)
    nxt = np.where(geo.hardened[owner], raw ^ geo.random[owner] ^ at.byteswap(), raw)
    slot = geo.slot(nxt, owner)
    good = readable & (slot >= 0)
    end = np.where(nxt != 0, len(address) + 1, len(address))
    return np.where(good, start[owner] + slot, end)


def _cpu_freelists(kernel, memory: _Memory, cache_list: list[Cache],
                   slabs: Slabs) -> tuple[np.ndarray, np.ndarray]:
    """(freelist head, slab index) of each CPU's active slab of each cache."""
    t = kernel.types
    c = "struct kmem_cache_cpu"
    fl = t.offsetof(c, "freelist")
    sl = t.offsetof(c, "slab") if t.has_member(c, "slab") else t.offsetof(c, "page")
    offsets = [kernel.percpu_offset(cpu) for cpu in percpu.possible_cpus(kernel)]
    at = [(cache.cpu_slab + off) & MASK for off in offsets for cache in cache_list]
    lo = min(fl, sl)
    raw = [memory.read(a + lo, max(fl, sl) + 8 - lo) for a in at]     # both fields at once
    head = np.array([_word(r, fl - lo) for r in raw], U64)
    slab = np.array([_word(r, sl - lo) for r in raw], U64)
    found = _slab_index(slabs, slab)
    keep = (head != 0) & (slab != 0) & (found >= 0)
    return head[keep], found[keep]


def _slab_index(slabs: Slabs, struct: np.ndarray) -> np.ndarray:
    """The slab index of each `struct slab` address, -1 where it is no known slab."""
    if not len(slabs.struct):
        return np.full(len(struct), -1, np.int64)
    order = np.argsort(slabs.struct)
    k = np.minimum(np.searchsorted(slabs.struct, struct, sorter=order), len(order) - 1)
    return np.where(slabs.struct[order[k]] == struct, order[k], -1)


def _partial_free(kernel, memory: _Memory, cache_list: list[Cache], slabs: Slabs) -> np.ndarray:
    """Per cache, the free objects of the slabs on its nodes' partial lists (what
    /proc/slabinfo counts as free)."""
    t = kernel.types
    kind = "struct slab" if t.has_type("struct slab") else "struct page"
    link = t.offsetof(kind, "slab_list")
    partial = t.offsetof("struct kmem_cache_node", "partial")
    entries = (slabs.struct + U64(link)).tolist()
    free = dict(zip(entries, (slabs.objects - slabs.inuse).tolist()))
    # the links of known slabs are in the struct pages already read
    links = dict(zip(entries, slabs.link.tolist()))

    def next_of(entry: int) -> int:
        return links[entry] if entry in links else memory.u64(entry)
    out = np.zeros(len(cache_list), np.int64)
    for i, cache in enumerate(cache_list):
        for node in cache.nodes:
            out[i] += sum(free.get(e, 0) for e in list_nodes(kernel, node + partial, 1 << 20, next_of))
    return out


def inventory(kernel, ram, pages: mm.Pages | None = None) -> Inventory:
    """Every allocated slab object in the frozen guest (`ram` is the snapshot's
    copy, and the kernel must read from it: see snapshot.guest_frozen)."""
    linear = kernel.guest.arch.linear_offset(kernel)
    if linear is None:
        raise QemuleakError("cannot find where the kernel maps RAM (its linear map)",
                            "pass --vmlinux or --system-map")
    pages = pages or mm.Pages(kernel, ram.ranges)
    memory = _Memory(kernel)
    cache_list = caches(kernel, memory)
    slabs, masks = _slabs(kernel, pages, cache_list, linear)
    reader = _Reader(ram, linear)
    cpu_heads, cpu_slabs = _cpu_freelists(kernel, memory, cache_list, slabs)
    heads = np.concatenate([slabs.freelist, cpu_heads])
    owner = np.concatenate([np.arange(len(slabs.base)), cpu_slabs])
    free, broken = _walk_freelists(reader, heads, owner, slabs, cache_list)
    geo = _Geometry.of(slabs, cache_list)
    slab_of, slot, _ = _slots(slabs.objects)
    objects = geo.start[slab_of] + slot.astype(U64) * geo.size[slab_of]
    if not (objects[1:] > objects[:-1]).all():     # slabs lie in address order, unless corrupt
        order = np.argsort(objects)
        objects, slab_of = objects[order], slab_of[order]
    allocated = ~np.isin(objects, _unique(free), assume_unique=True)
    cache = slabs.cache[slab_of]
    slots = np.bincount(slabs.cache, slabs.objects, len(cache_list)).astype(np.int64)
    return Inventory(cache_list, objects[allocated], cache[allocated], masks, slots,
                     np.bincount(cache[~allocated], minlength=len(cache_list)),
                     _partial_free(kernel, memory, cache_list, slabs),
                     sorted({cache_list[int(slabs.cache[s])].name for s in broken.tolist()}),
                     objects[~allocated], cache[~allocated])


def _slots(n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For slabs of `n` objects each: the slab and slot number of every object
    slot, in slab order, and where each slab's slots start."""
    first = np.cumsum(n) - n
    slot = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
    return np.repeat(np.arange(len(n)), n), slot, first


def _unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2 hashes, 10x slower here and 20 ms on first use."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


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


def requested_sizes(kernel, ram, inv: Inventory) -> np.ndarray:
    """Each object's size as its allocator was asked: the stored request of a
    kmalloc cache that keeps one (see Cache.keeps_requested_size), else the
    cache's object_size. A stored value out of (0, object_size] is not trusted."""
    sizes = inv.sizes
    where = np.array([c.tracks + 2 * kernel.types.sizeof("struct track")
                      if c.keeps_requested_size else -1 for c in inv.caches], np.int64)[inv.cache]
    kept = where >= 0
    if not kept.any():
        return sizes
    reader = _Reader(ram, kernel.guest.arch.linear_offset(kernel))
    values, ok = reader.u64(inv.addresses[kept] + where[kept].astype(U64))
    stored = (values & U64(0xFFFFFFFF)).astype(np.int64)
    good = ok & (stored > 0) & (stored <= sizes[kept])
    out = sizes.copy()
    out[np.flatnonzero(kept)[good]] = stored[good]
    return out
