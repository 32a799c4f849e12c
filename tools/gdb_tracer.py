"""The baseline for tools/bench_trace.py: the same tracer written the way gdb
slab plugins are, as gdb Python breakpoints. Sourced into gdb; reads
QEMULEAK_PROBES (addr:role:size_reg:nop_len,...) from the environment.

Entry stop: read the size argument, the return address at [rsp] and the task's
comm through gdb, plant a temporary return breakpoint; return stop: record the
result. Frees: one stop. Every stop returns False (gdb resumes the guest)."""

import os

import gdb  # noqa: F401 - provided by gdb

COUNTS = {"allocs": 0, "frees": 0, "stops": 0}
LIVE = {}
PENDING = {}


def reg(name):
    return int(gdb.parse_and_eval(f"${name}")) & (2**64 - 1)


class Return(gdb.Breakpoint):
    def __init__(self, address):
        super().__init__(f"*{address:#x}", internal=True, temporary=False)
        self.address = address

    def stop(self):
        COUNTS["stops"] += 1
        sp = reg("rsp")
        entry = PENDING.pop(sp, None)
        if entry is not None:
            LIVE[reg("rax")] = entry
            COUNTS["allocs"] += 1
        if not any(e[2] == self.address for e in PENDING.values()):
            RETURNS.pop(self.address, None)
            gdb.post_event(self.delete)
        return False


RETURNS = {}


class Entry(gdb.Breakpoint):
    def __init__(self, address, role, size_reg):
        super().__init__(f"*{address:#x}", internal=True)
        self.role, self.size_reg = role, size_reg

    def stop(self):
        COUNTS["stops"] += 1
        if self.role == "free":
            LIVE.pop(reg("rdi" if self.size_reg == "rdi" else "rsi"), None)
            COUNTS["frees"] += 1
            return False
        sp = reg("rsp")
        ret = int(gdb.parse_and_eval(f"*(unsigned long *){sp}")) & (2**64 - 1)
        PENDING[sp + 8] = (reg(self.size_reg), COMM_READER(), ret)
        if ret not in RETURNS:
            RETURNS[ret] = Return(ret)
        return False


def comm_reader():
    gs = reg("gs_base")
    task = int(gdb.parse_and_eval(f"*(unsigned long *)({gs} + {CURRENT_TASK})")) & (2**64 - 1)
    return bytes(gdb.selected_inferior().read_memory(task + COMM_OFFSET, 16)).split(b"\0")[0]


CURRENT_TASK = int(os.environ["QEMULEAK_CURRENT_TASK"])
COMM_OFFSET = int(os.environ["QEMULEAK_COMM_OFFSET"])
COMM_READER = comm_reader
for spec in os.environ["QEMULEAK_PROBES"].split(","):
    address, role, size_reg = spec.split(":")
    Entry(int(address, 16), role, size_reg)
