"""The stack depot (lib/stackdepot.c): backtraces the kernel saved once and refers
to by a 32-bit handle, e.g. in SLUB's allocation tracks (`slub_debug=U`).

A handle is `union handle_parts`: a pool index, the record's offset in that pool
(>> 4) and a few extra bits. Its layout is read from the kernel's types:
- up to 6.2: `slabindex`, `offset`, `valid` (pools are `stack_slabs[]`);
- 6.3: renamed `pool_index` (pools are `stack_pools[]`), still with `valid`;
- 6.8: `valid` is gone and the index is stored plus one, so that 0 is no handle;
  the record keeps its own handle (`stack_record.handle`);
- 6.13 (backported to 6.12.y): the field says so, `pool_index_plus_1`;
- later kernels allocate `stack_pools` (a `void **`) instead of a static array:
  a record whose own handle does not match is looked up that way too.
"""

from ..errors import QemuleakError

STACK_ALLOC_ALIGN = 4          # a record's offset in its pool is stored >> 4


class _Layout:
    """Where a handle's fields sit, for this kernel."""

    def __init__(self, kernel):
        t = kernel.types
        parts = "union handle_parts"
        self.pools = kernel.symbols.get("stack_slabs") or kernel.symbols.get("stack_pools")
        if self.pools is None or not t.has_type(parts) or not t.has_type("struct stack_record"):
            raise QemuleakError("this kernel's stack depot is unknown (no stack_pools or its types)",
                                "backtraces of slab tracks need a kernel with CONFIG_STACKDEPOT")
        for name, plus in (("slabindex", 0), ("pool_index_plus_1", 1), ("pool_index", 0)):
            if t.has_member(parts, name):
                self.index, self.plus = t.member_bits(parts, name), plus
                break
        else:
            raise QemuleakError("union handle_parts has no pool index this version of qemuleak "
                                "knows (slabindex, pool_index, pool_index_plus_1)",
                                "please report the kernel version")
        self.offset = t.member_bits(parts, "offset")
        self.valid = t.member_bits(parts, "valid") if t.has_member(parts, "valid") else None
        if self.valid is None and self.plus == 0 and self.index[0] != 0:
            raise QemuleakError("union handle_parts has an unknown layout", "please report it")
        if self.valid is None:
            self.plus = 1      # 6.8: no valid bit, the index is stored plus one
        extra = t.member_bits(parts, "extra") if t.has_member(parts, "extra") else None
        self.extra_mask = ((1 << extra[1]) - 1) << extra[0] if extra else 0
        rec = "struct stack_record"
        self.size_off = t.offsetof(rec, "size")
        self.entries_off = t.offsetof(rec, "entries")
        self.handle_off = t.offsetof(rec, "handle") if t.has_member(rec, "handle") else None

    @staticmethod
    def field(h: int, bits: tuple[int, int]) -> int:
        return h >> bits[0] & ((1 << bits[1]) - 1)

    def pool_index(self, h: int) -> int | None:
        """The pool `h` points into; None when `h` is no valid handle."""
        if self.valid is not None and not self.field(h, self.valid):
            return None
        index = self.field(h, self.index) - self.plus
        return index if index >= 0 else None


def fetch(kernel, handles) -> dict[int, tuple[int, ...]]:
    """The saved backtrace of each handle (return addresses, innermost first);
    handles that are 0 or do not decode are left out."""
    lay = _Layout(kernel)
    pointer_array: list[int] = []          # the `void **stack_pools` form, when met

    def record_of(h: int, index: int, base: int) -> int | None:
        pool = kernel.read_u64(base + 8 * index)
        if not pool:
            return None
        record = pool + (lay.field(h, lay.offset) << STACK_ALLOC_ALIGN)
        if lay.handle_off is not None:
            own = kernel.read_u32(record + lay.handle_off)
            if (own ^ h) & ~lay.extra_mask & 0xffffffff:
                return None
        return record

    def find(h: int, index: int) -> int | None:
        for attempt in range(2 if lay.handle_off is not None else 1):
            if attempt:                    # `void **stack_pools`: through the pointer
                if not pointer_array:
                    try:
                        pointer_array.append(kernel.read_u64(lay.pools))
                    except QemuleakError:
                        pointer_array.append(0)
                base = pointer_array[0]
            else:
                base = lay.pools
            try:
                record = record_of(h, index, base) if base else None
            except QemuleakError:
                record = None
            if record is not None:
                return record
        return None

    out = {}
    for h in set(int(x) for x in handles):
        index = lay.pool_index(h) if h else None
        if index is None:
            continue
        record = find(h, index)
        if record is None:
            continue
        try:
            n = kernel.read_u32(record + lay.size_off)
            if not 0 < n <= 64:
                continue
            raw = kernel.read(record + lay.entries_off, 8 * n)
        except QemuleakError:
            continue
        out[h] = tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))
    return out
