"""The stack depot (lib/stackdepot.c): backtraces the kernel saved once and refers
to by a 32-bit handle, e.g. in SLUB's allocation tracks (`slub_debug=U`)."""

from ..errors import QemuleakError

STACK_ALLOC_ALIGN = 4          # a record's offset in its pool is stored >> 4


def fetch(kernel, handles) -> dict[int, tuple[int, ...]]:
    """The saved backtrace of each handle (return addresses, innermost first);
    handles that are 0 or do not decode are left out."""
    t = kernel.types
    pools = kernel.symbols.get("stack_slabs") or kernel.symbols.get("stack_pools")
    parts = "union handle_parts"
    if pools is None or not t.has_type(parts) or not t.has_type("struct stack_record"):
        raise QemuleakError("this kernel's stack depot is unknown (no stack_slabs or its types)",
                            "backtraces of slab tracks need a kernel with CONFIG_STACKDEPOT")
    index = t.member_bits(parts, "slabindex" if t.has_member(parts, "slabindex") else "pool_index")
    offset, valid = t.member_bits(parts, "offset"), t.member_bits(parts, "valid")
    size_off = t.offsetof("struct stack_record", "size")
    entries_off = t.offsetof("struct stack_record", "entries")
    field = lambda h, bits: h >> bits[0] & ((1 << bits[1]) - 1)     # noqa: E731
    out = {}
    for h in set(int(x) for x in handles):
        if not h or not field(h, valid):
            continue
        pool = kernel.read_u64(pools + 8 * field(h, index))
        if not pool:
            continue
        record = pool + (field(h, offset) << STACK_ALLOC_ALIGN)
        try:
            n = kernel.read_u32(record + size_off)
            if not 0 < n <= 64:
                continue
            raw = kernel.read(record + entries_off, 8 * n)
        except QemuleakError:
            continue
        out[h] = tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))
    return out
