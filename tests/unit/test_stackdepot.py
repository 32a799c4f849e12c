"""Stack depot handles of each layout the kernel has had, decoded from fake memory."""

import pytest

from qemuleak.errors import QemuleakError
from qemuleak.kernel import stackdepot

POOLS = 0xFFFFFFFF82000000          # the stack_pools / stack_slabs array
POOL = 0xFFFF888001000000           # pool 3
# (union handle_parts bitfields, struct stack_record offsets) per layout
LAYOUTS = {
    # 6.1: slabindex, offset, valid; stack_slabs; no handle in the record
    "6.1": ({"slabindex": (0, 16), "offset": (16, 10), "valid": (26, 1), "extra": (27, 5)},
            {"size": 12, "entries": 24}, "stack_slabs"),
    # 6.8: no valid bit, the index stored plus one; the record keeps its handle
    "6.8": ({"pool_index": (0, 17), "offset": (17, 10), "extra": (27, 5)},
            {"size": 20, "handle": 24, "entries": 32}, "stack_pools"),
    # 6.13 / 6.12.y: the same, named for what it is
    "6.12.118": ({"pool_index_plus_1": (0, 17), "offset": (17, 10), "extra": (27, 5)},
                 {"size": 20, "handle": 24, "entries": 32}, "stack_pools"),
}


class Types:
    def __init__(self, parts, record):
        self.members = {"union handle_parts": parts, "struct stack_record": record}

    def has_type(self, name):
        return name in self.members

    def has_member(self, name, member):
        return member in self.members[name]

    def member_bits(self, name, member):
        return self.members[name][member]

    def offsetof(self, name, member):
        return self.members[name][member]


class Kernel:
    def __init__(self, layout):
        parts, record, pools = LAYOUTS[layout]
        self.types = Types(parts, record)
        self.symbols = {pools: POOLS}
        self.memory: dict[int, int] = {}               # byte address -> value

    def write(self, at, data):
        self.memory.update({at + i: b for i, b in enumerate(data)})

    def read(self, at, n):
        try:
            return bytes(self.memory[at + i] for i in range(n))
        except KeyError:
            raise QemuleakError(f"{at:#x} is not mapped") from None

    def read_u64(self, at):
        return int.from_bytes(self.read(at, 8), "little")

    def read_u32(self, at):
        return int.from_bytes(self.read(at, 4), "little")


def handle(layout, index, offset, extra=0):
    parts = LAYOUTS[layout][0]
    stored = {"slabindex": index, "pool_index": index + 1, "pool_index_plus_1": index + 1}
    h = offset << parts["offset"][0] | extra << parts["extra"][0]
    for name, value in stored.items():
        if name in parts:
            h |= value << parts[name][0]
    if "valid" in parts:
        h |= 1 << parts["valid"][0]
    return h


def record(kernel, layout, at, h, frames):
    off = LAYOUTS[layout][1]
    kernel.write(at + off["size"], len(frames).to_bytes(4, "little"))
    if "handle" in off:
        kernel.write(at + off["handle"], h.to_bytes(4, "little"))
    kernel.write(at + off["entries"], b"".join(f.to_bytes(8, "little") for f in frames))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout(layout):
    k = Kernel(layout)
    k.write(POOLS, bytes(8 * 3) + POOL.to_bytes(8, "little"))      # pools 0-2 empty, 3 is POOL
    frames = (0xFFFFFFFF81000010, 0xFFFFFFFF81000020)
    h = handle(layout, 3, 5, extra=7)
    record(k, layout, POOL + (5 << 4), h, frames)
    other = handle(layout, 3, 9)            # a record that is not there (not mapped)
    assert stackdepot.fetch(k, [h, h, 0, other]) == {h: frames}
    if "valid" in LAYOUTS[layout][0]:
        assert stackdepot.fetch(k, [h & ~(1 << 26)]) == {}            # not valid
    else:
        assert stackdepot.fetch(k, [h & ~0x1FFFF]) == {}              # index 0: no handle
        # the record's own handle must match: a stale or moved pool is not read as it
        record(k, layout, POOL + (5 << 4), handle(layout, 2, 5), frames)
        assert stackdepot.fetch(k, [h]) == {}


def test_pools_allocated_later():
    """Kernels after 6.12 allocate `stack_pools` (a void **): found through the
    pointer when the array reading gives a record of another handle."""
    k = Kernel("6.12.118")
    table = 0xFFFF888002000000
    k.write(POOLS, table.to_bytes(8, "little"))
    k.write(table, bytes(8) + POOL.to_bytes(8, "little"))
    h = handle("6.12.118", 1, 2)
    record(k, "6.12.118", POOL + (2 << 4), h, (0xFFFFFFFF81000030,))
    k.write(POOLS + 8, (POOL + 4096).to_bytes(8, "little"))    # the array reading: no record
    assert stackdepot.fetch(k, [h]) == {h: (0xFFFFFFFF81000030,)}


def test_unknown_layout():
    k = Kernel("6.8")
    del k.types.members["union handle_parts"]["pool_index"]
    with pytest.raises(QemuleakError, match="pool index"):
        stackdepot.fetch(k, [1])
