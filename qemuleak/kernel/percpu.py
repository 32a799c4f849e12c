"""Per-CPU memory: which CPUs may exist, where each one's static area lies, and
what the per-CPU allocator's chunks hold."""

from dataclasses import dataclass

import numpy as np

from ..errors import QemuleakError
from . import mm
from .lists import list_nodes


def possible_cpus(kernel) -> list[int]:
    """CPU numbers in `__cpu_possible_mask`; without that symbol (kallsyms of text
    only), the vCPUs QEMU has."""
    mask = kernel.symbols.get("__cpu_possible_mask")
    if mask is None:
        return list(range(len(kernel.guest.cpus())))
    ids = kernel.symbols.get("nr_cpu_ids")
    n = kernel.read_u32(ids) if ids is not None else 64
    bits = int.from_bytes(kernel.read(mask, (n + 63) // 64 * 8), "little")
    return [cpu for cpu in range(n) if bits >> cpu & 1]


def static_areas(kernel) -> list[tuple[int, int]]:
    """(start, size) of the kernel's static per-CPU section, once per possible CPU:
    the copies of every DEFINE_PER_CPU variable (modules' ones live in the first
    chunk's reserved part, reached through `struct module`)."""
    start, end = kernel.symbols.get("__per_cpu_start"), kernel.symbols.get("__per_cpu_end")
    if start is None or end is None:
        raise QemuleakError("the per-CPU section is unknown: no __per_cpu_start/__per_cpu_end",
                            "pass --vmlinux or --system-map")
    return [((start + kernel.percpu_offset(cpu)) & (2**64 - 1), end - start)
            for cpu in possible_cpus(kernel)]


MIN_ALLOC = 4        # PCPU_MIN_ALLOC_SIZE: one bit of a chunk's maps


@dataclass(frozen=True)
class ChunkMap:
    """The allocations and the free space of the per-CPU chunks' dynamic parts,
    at unit offsets: add `base` (the per-CPU cookie of unit offset 0 of the
    chunk) for a per-CPU pointer, and a CPU's offset for its copy."""

    base: np.ndarray           # uint64, per allocation
    start: np.ndarray          # int64 byte offset in the unit
    size: np.ndarray           # int64
    free_base: np.ndarray      # the same for free space
    free_start: np.ndarray
    free_size: np.ndarray

    def cookies(self) -> np.ndarray:
        return self.base + self.start.astype(np.uint64)


def chunk_map(kernel) -> ChunkMap:
    """Every dynamic per-CPU allocation (alloc_percpu and friends) and every free
    range, from the chunks' allocation and boundary bitmaps (mm/percpu.c): a
    boundary bit with its allocation bit set starts an allocation, which runs to
    the next boundary bit; free ranges are the runs of clear allocation bits
    (freeing leaves stale boundary bits inside them). The reserved chunk (modules' static per-CPU variables) is
    included; the first chunk's static part is not."""
    sym = kernel.symbols.get
    names = ("pcpu_first_chunk", "pcpu_chunk_lists", "pcpu_nr_slots", "pcpu_base_addr",
             "__per_cpu_start")
    if any(sym(n) is None for n in names):
        raise QemuleakError("the per-CPU allocator's chunks are unknown: "
                            f"one of {', '.join(names)} is not in the symbols",
                            "pass --vmlinux or --system-map")
    t = kernel.types
    off = {f: t.offsetof("struct pcpu_chunk", f) for f in (
        "list", "base_addr", "alloc_map", "bound_map", "start_offset", "end_offset", "nr_pages")}
    reserved = kernel.read_u64(sym("pcpu_reserved_chunk")) if sym("pcpu_reserved_chunk") else 0
    lists = kernel.read_u64(sym("pcpu_chunk_lists"))
    slots = kernel.read_u32(sym("pcpu_nr_slots"))
    if not 0 < slots < 1024:
        raise QemuleakError(f"pcpu_nr_slots is {slots}: the per-CPU allocator is not set up")
    found = {kernel.read_u64(sym("pcpu_first_chunk")), reserved}
    for slot in range(slots):
        found |= {node - off["list"] for node in list_nodes(kernel, lists + 16 * slot)}
    to_cookie = (sym("__per_cpu_start") - kernel.read_u64(sym("pcpu_base_addr"))) & (2**64 - 1)
    parts = {k: [] for k in ("base", "start", "size", "free_base", "free_start", "free_size")}
    width = {f: 4 if f in ("start_offset", "end_offset", "nr_pages") else 8 for f in off}
    first = min(off.values())
    span = max(off[f] + width[f] for f in off) - first
    for chunk in sorted(found - {0}):
        raw = kernel.read(chunk + first, span)           # the fields used, in one piece
        at = {f: o - first for f, o in off.items()}
        read = lambda f: int.from_bytes(raw[at[f]:at[f] + width[f]], "little")  # noqa: E731
        bits = read("nr_pages") * mm.PAGE // MIN_ALLOC
        if not 0 < bits <= 1 << 26:
            raise QemuleakError(f"per-CPU chunk {chunk:#x} has {bits} map bits: not a chunk")
        alloc = _bitmap(kernel, read("alloc_map"), bits)
        bound = _bitmap(kernel, read("bound_map"), bits + 1)
        bound[0] = bound[bits] = True
        lo = _signed32(read("start_offset")) // MIN_ALLOC
        hi = bits - _signed32(read("end_offset")) // MIN_ALLOC
        edges = np.flatnonzero(bound)
        starts, ends = edges[:-1], edges[1:]
        # free ranges may hold stale boundary bits: take them from the allocation bits
        used = alloc[starts]
        free_bits = np.flatnonzero(np.diff(np.concatenate(([0], (~alloc).astype(np.int8), [0]))))
        fs, fe = free_bits[::2], free_bits[1::2]
        base = (read("base_addr") + to_cookie) & (2**64 - 1)
        keep = used & (starts >= lo) & (ends <= hi)
        fkeep = (fs >= lo) & (fe <= hi)
        for k, v in (("start", starts[keep]), ("size", ends[keep] - starts[keep]),
                     ("free_start", fs[fkeep]), ("free_size", fe[fkeep] - fs[fkeep])):
            parts[k].append(v.astype(np.int64) * MIN_ALLOC)
        parts["base"].append(np.full(int(keep.sum()), base, np.uint64))
        parts["free_base"].append(np.full(int(fkeep.sum()), base, np.uint64))
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.uint64 if "base" in k else np.int64)
           for k, v in parts.items()}
    return ChunkMap(**cat)


def _bitmap(kernel, at: int, bits: int) -> np.ndarray:
    """A kernel bitmap of `bits` bits (whole longs, as BITS_TO_LONGS allocates)."""
    raw = np.frombuffer(kernel.read(at, (bits + 63) // 64 * 8), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:bits].astype(bool)


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >> 31 else v


def variable(symbols, address: int) -> str:
    """The static per-CPU variable at CPU-0 link `address`, as "name+0xoff".
    x86_64 links per-CPU variables at 0: absolute symbols, which address lookups
    skip, so they are searched here."""
    sym = symbols.lookup(address)
    if sym is not None:
        return sym.format(address)
    idx = np.flatnonzero(symbols.absolute)
    at = symbols.addresses[idx]
    k = int(np.searchsorted(at, np.uint64(address), side="right")) - 1
    if k < 0:
        return f"{address:#x}"
    return f"{symbols.names[int(idx[k])]}+{address - int(at[k]):#x}"
