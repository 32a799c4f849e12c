"""vmalloc: the kernel's busy virtual areas (`struct vmap_area`) and their vm_struct."""

from dataclasses import dataclass

from ..errors import KernelTypeError
from .lists import Links, list_nodes


@dataclass(frozen=True)
class VmapArea:
    start: int            # va_start
    end: int              # va_end (a guard page included, when the area has one)
    address: int          # the struct vmap_area
    vm: int               # its struct vm_struct, 0 for vm_map_ram areas
    caller: int           # vm->caller: who asked for the area (0 without vm)
    flags: int            # vm->flags


def allocator_words(kernel, busy: list[VmapArea] | None = None) -> list[int]:
    """Addresses of the allocator's own words that point at vmalloc areas (the
    references every area has, which are not its user's): va_start and va_end of
    every vmap_area, busy, free or waiting to be purged (a free area ends where a
    busy one starts), and vm_struct.addr of the busy ones. `busy`: the busy areas,
    if the caller has walked them already."""
    t = kernel.types
    start_off = t.offsetof("struct vmap_area", "va_start")
    end_off = t.offsetof("struct vmap_area", "va_end")
    out = []
    for a in busy if busy is not None else for_each_vmap_area(kernel):
        out += [a.address + start_off, a.address + end_off]
        if a.vm:
            out.append(a.vm + t.offsetof("struct vm_struct", "addr"))
    list_off = t.offsetof("struct vmap_area", "list")
    heads = [kernel.sym(name) for name in ("free_vmap_area_list", "purge_vmap_area_list")
             if kernel.symbols.get(name) is not None]
    for head in heads + _node_free_lists(kernel):
        for node in list_nodes(kernel, head):
            out += [node - list_off + start_off, node - list_off + end_off]
    return out


def _node_free_lists(kernel) -> list[int]:
    """6.9 (vmap_area lists split per node, `struct vmap_node`): what purge_vmap_area_list held
    is on each node's `lazy` list and `purge_list`, and freed areas kept for reuse are
    on its `pool[]` lists. The heads of those that are not empty."""
    t = kernel.types
    if kernel.symbols.get("vmap_nodes") is None or not t.has_member("struct vmap_node", "lazy"):
        return []
    nodes = kernel.read_u64(kernel.sym("vmap_nodes"))
    count = kernel.read_u32(kernel.sym("nr_vmap_nodes")) if kernel.symbols.get("nr_vmap_nodes") else 1
    size = t.sizeof("struct vmap_node")
    offsets = [t.offsetof("struct vmap_node", "lazy") + t.offsetof("struct rb_list", "head")]
    if t.has_member("struct vmap_node", "purge_list"):
        offsets.append(t.offsetof("struct vmap_node", "purge_list"))
    if t.has_member("struct vmap_node", "pool"):
        pool, each = t.offsetof("struct vmap_node", "pool"), t.sizeof("struct vmap_pool")
        head = t.offsetof("struct vmap_pool", "head")
        offsets += [pool + i * each + head for i in range(t.member_size("struct vmap_node", "pool") // each)]
    out = []
    for i in range(count):
        raw = kernel.read(nodes + i * size, size)      # one read: most lists are empty
        for off in offsets:
            if int.from_bytes(raw[off:off + 8], "little") != nodes + i * size + off:
                out.append(nodes + i * size + off)
    return out


def for_each_vmap_area(kernel, limit: int = 1 << 20) -> list[VmapArea]:
    """Every busy vmap_area, from `vmap_area_list` (up to 6.8) or the busy lists
    of `vmap_nodes` (6.9+)."""
    t = kernel.types
    heads = []
    if kernel.symbols.get("vmap_area_list") is not None:
        heads = [kernel.sym("vmap_area_list")]
    elif kernel.symbols.get("vmap_nodes") is not None and t.has_member("struct vmap_node", "busy"):
        nodes = kernel.read_u64(kernel.sym("vmap_nodes"))
        count = kernel.read_u32(kernel.sym("nr_vmap_nodes")) if kernel.symbols.get("nr_vmap_nodes") else 1
        size = t.sizeof("struct vmap_node")
        busy = t.offsetof("struct vmap_node", "busy") + t.offsetof("struct rb_list", "head")
        heads = [nodes + i * size + busy for i in range(count)]
    else:
        raise KernelTypeError("cannot find the kernel's vmalloc areas: neither vmap_area_list "
                              "nor vmap_nodes is in the symbols", "pass --vmlinux or --system-map")
    list_off = t.offsetof("struct vmap_area", "list")
    start_off = t.offsetof("struct vmap_area", "va_start")
    end_off = t.offsetof("struct vmap_area", "va_end")
    vm_off = t.offsetof("struct vmap_area", "vm")
    caller_off = t.offsetof("struct vm_struct", "caller")
    flags_off = t.offsetof("struct vm_struct", "flags")
    # each struct read in one piece (small reads cost the most), the list's
    # next pointer with it
    size = max(start_off, end_off, vm_off, list_off) + 8
    vm_lo = min(caller_off, flags_off)
    vm_size = max(caller_off, flags_off) + 8 - vm_lo
    next_of = Links(kernel)
    out = []
    for head in heads:
        for node in list_nodes(kernel, head, limit, next_of):
            va = node - list_off
            raw = kernel.read(va, size)
            word = lambda off: int.from_bytes(raw[off:off + 8], "little")   # noqa: E731
            next_of.known[node] = word(list_off)
            vm = word(vm_off)
            # `vm` shares a union with subtree_max_size: only a kernel pointer is a vm
            caller = flags = 0
            if vm >> 63:
                fields = kernel.read(vm + vm_lo, vm_size)
                caller = int.from_bytes(fields[caller_off - vm_lo:caller_off - vm_lo + 8], "little")
                flags = int.from_bytes(fields[flags_off - vm_lo:flags_off - vm_lo + 8], "little")
            else:
                vm = 0
            out.append(VmapArea(word(start_off), word(end_off), va, vm, caller, flags))
    return out


# vm_struct.flags (include/linux/vmalloc.h; the same values since 2.6)
VM_ALLOC = 0x2
VM_UNINITIALIZED = 0x20
VM_NO_GUARD = 0x40
PAGE = 4096


def allocations(kernel, areas: list[VmapArea] | None = None) -> list[tuple[int, int, int]]:
    """What vmalloc handed out, as (start, size, caller): busy VM_ALLOC areas that
    are set up, at the size their user has (the guard page left out). Per-CPU
    chunks are left out: they hold many allocations of the per-CPU allocator,
    and no user points at them."""
    pcpu = kernel.symbols.get("pcpu_get_vm_areas")
    out = []
    for a in areas if areas is not None else for_each_vmap_area(kernel):
        if not a.vm or a.flags & (VM_ALLOC | VM_UNINITIALIZED) != VM_ALLOC:
            continue
        if pcpu is not None and a.caller == pcpu:
            continue
        size = a.end - a.start - (0 if a.flags & VM_NO_GUARD else PAGE)
        if size > 0:
            out.append((a.start, size, a.caller))
    return out
