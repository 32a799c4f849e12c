"""tasks.exited: an exited task's comm from its freed task_struct. Checked on real
guests by test_scan's rmmod leak (its comm, in tracks mode); these cover the
edges: the free pointer on the fields, a merged cache, garbage."""

import numpy as np

from qemuleak.kernel import slub, tasks

COMM, PID, SIZE = 0x700, 0x500, 0x1000


class Types:
    def offsetof(self, name, member):
        return {"comm": COMM, "pid": PID}[member]

    def member_size(self, name, member):
        return 16


class Kernel:
    def __init__(self, memory: dict[int, bytes]):
        self.types, self.memory = Types(), memory

    def read(self, at, size):
        base = at & ~(SIZE - 1)
        return self.memory[base][at - base:at - base + size]


def task_bytes(pid: int, comm: bytes) -> bytes:
    raw = bytearray(SIZE)
    raw[PID:PID + 4] = pid.to_bytes(4, "little", signed=True)
    raw[COMM:COMM + len(comm)] = comm
    return bytes(raw)


def inventory(free: list[int], offset: int = 0x800, name: str = "task_struct") -> slub.Inventory:
    caches = [slub.Cache(0, "kmalloc-64", 64, 64, 32, None, 0, 0, ()),
              slub.Cache(0, name, SIZE, SIZE, offset, None, 0, 0, ())]
    addresses = np.array(free + [0x9000], np.uint64)
    return slub.Inventory(caches, np.zeros(0, np.uint64), np.zeros(0, np.int64), [],
                          np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64),
                          free_objects=addresses,
                          free_cache=np.array([1] * len(free) + [0], np.int64))


def test_freed_task_structs_name_their_pids():
    k = Kernel({0x1000: task_bytes(97, b"sleep"), 0x2000: task_bytes(0, b""),
                0x3000: task_bytes(-5, b"\x01\x02"), 0x9000: task_bytes(98, b"not a task")})
    assert tasks.exited(k, inventory([0x1000, 0x2000, 0x3000])) == {97: "sleep"}


def test_nothing_when_the_free_pointer_sits_on_comm_or_pid():
    k = Kernel({0x1000: task_bytes(97, b"sleep")})
    assert tasks.exited(k, inventory([0x1000], offset=COMM + 8)) == {}
    assert tasks.exited(k, inventory([0x1000], offset=PID - 4)) == {}
    assert tasks.exited(k, inventory([0x1000], offset=PID - 8)) == {97: "sleep"}


def test_nothing_when_the_cache_was_merged_into_another():
    k = Kernel({0x1000: task_bytes(97, b"sleep")})
    assert tasks.exited(k, inventory([0x1000], name=":0001024")) == {}
