"""Tasks: the current task of each vCPU, and a task's comm and pid."""

from dataclasses import dataclass
from itertools import chain

from ..errors import KernelTypeError, QemuleakError
from .lists import Links, list_nodes

# Per-CPU variables that point at the running task, by what the kernel has:
# x86_64 `current_task` (moved into `pcpu_hot` in 6.2), arm64 `__entry_task`.
_CURRENT_VARS = ("current_task", "__entry_task")


@dataclass(frozen=True)
class Task:
    address: int
    comm: str
    pid: int


def current_task(kernel, cpu: int, regs: dict | None = None) -> int:
    """Address of the task_struct running on `cpu` (whose registers are `regs`,
    when the caller has them already)."""
    # A register is exact except right on a kernel entry path, where it may
    # still hold a user value: trust it only if it reads like a task.
    in_reg = kernel.guest.arch.current_task(regs if regs is not None else kernel.guest.registers(cpu))
    if in_reg is not None and _looks_like_task(kernel, in_reg):
        return in_reg
    for name in _CURRENT_VARS:
        if kernel.symbols.get(name) is not None:
            return kernel.read_u64(kernel.percpu(name, cpu))
    if kernel.symbols.get("pcpu_hot") is not None:
        off = kernel.types.offsetof("struct pcpu_hot", "current_task")
        return kernel.read_u64(kernel.percpu("pcpu_hot", cpu) + off)
    raise KernelTypeError(f"cannot tell which task runs on CPU {cpu}: it is on a kernel "
                          f"entry path and none of {', '.join(_CURRENT_VARS)}, pcpu_hot "
                          "is in the symbols")


def preempt_count_reader(kernel):
    """A function (per-CPU base of a CPU, a callable giving its current task) -> that
    CPU's preempt count (HARDIRQ_MASK, SOFTIRQ_OFFSET...), from what the kernel has:
    x86's per-CPU `__preempt_count` (up to 6.1), x86's `pcpu_hot.preempt_count` (6.2
    moved the hot per-CPU variables into `struct pcpu_hot`; 6.12 has it), else the
    current task's thread_info.preempt_count (arm64). Reads 0 when none is known."""
    t = kernel.types
    count = kernel.symbols.get("__preempt_count")
    if count is None and kernel.symbols.get("pcpu_hot") is not None \
            and t.has_member("struct pcpu_hot", "preempt_count"):
        count = kernel.sym("pcpu_hot") + t.offsetof("struct pcpu_hot", "preempt_count")
    if count is not None:
        return lambda base, current: kernel.read_u32(base + count)
    if t.has_member("struct task_struct", "thread_info") and \
            t.has_member("struct thread_info", "preempt_count"):
        off = t.offsetof("struct task_struct", "thread_info") + \
            t.offsetof("struct thread_info", "preempt_count")
        return lambda base, current: kernel.read_u32(current() + off)
    return lambda base, current: 0


def _looks_like_task(kernel, address: int) -> bool:
    try:
        t = task(kernel, address)
    except QemuleakError:
        return False
    return 0 <= t.pid <= 1 << 22 and t.comm.isprintable()


def task(kernel, address: int) -> Task:
    """comm and pid of the task_struct at `address`."""
    t = kernel.types
    comm_off = t.offsetof("struct task_struct", "comm")
    pid_off = t.offsetof("struct task_struct", "pid")
    comm = kernel.read(address + comm_off, t.member_size("struct task_struct", "comm"))
    return _task(address, comm, kernel.read(address + pid_off, 4))


def _task(address: int, comm: bytes, pid: bytes) -> Task:
    return Task(address, comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
                int.from_bytes(pid, "little", signed=True))


def exited(kernel, inv) -> dict[int, str]:
    """pid -> comm of tasks that exited and whose task_struct is free in the
    task_struct cache (`inv`: the SLUB inventory), not yet handed out again: SLUB
    leaves a freed object's bytes as they were but for its free pointer. Where that
    pointer sits on comm or pid, or the cache was merged, nothing."""
    cache, free = inv.free_of("task_struct")
    t = kernel.types
    comm_off = t.offsetof("struct task_struct", "comm")
    comm_size = t.member_size("struct task_struct", "comm")
    pid_off = t.offsetof("struct task_struct", "pid")
    lo, hi = min(comm_off, pid_off), max(comm_off + comm_size, pid_off + 4)
    if cache is None or lo < cache.offset + 8 and cache.offset < hi:
        return {}
    out = {}
    for address in free.tolist():
        raw = kernel.read(address + lo, hi - lo)
        found = _task(address, raw[comm_off - lo:comm_off - lo + comm_size],
                      raw[pid_off - lo:pid_off - lo + 4])
        if 0 < found.pid <= 1 << 22 and found.comm and found.comm.isprintable():
            out[found.pid] = found.comm
    return out


def for_each_task(kernel, limit: int = 1 << 20):
    """Every task (thread-group leaders) on init_task's list."""
    t = kernel.types
    tasks_off = t.offsetof("struct task_struct", "tasks")
    yield task(kernel, kernel.sym("init_task"))
    for node in list_nodes(kernel, kernel.sym("init_task") + tasks_off, limit):
        yield task(kernel, node - tasks_off)


@dataclass(frozen=True)
class Thread:
    """A thread as the thread walk reads it: its Task, the lowest address of its
    kernel stack (task->stack) and the stack pointer it saved when switched out
    (None if the kernel has no field we know: see saved_sp)."""

    task: Task
    stack: int
    saved_sp: int | None


def for_each_thread(kernel, limit: int = 1 << 20):
    """Every thread: each leader's thread group, through signal->thread_head and
    thread_node (where they exist) or the older thread_group list."""
    for thread in threads(kernel, limit):
        yield thread.task


def threads(kernel, limit: int = 1 << 20):
    """for_each_thread's walk, as Threads. Each task_struct is read once, in one
    piece from its first field used to its last: small reads cost the most."""
    t = kernel.types
    k = "struct task_struct"
    group = t.has_member(k, "thread_node")        # else the older thread_group list
    node_off = t.offsetof(k, "thread_node" if group else "thread_group")
    tasks_off = t.offsetof(k, "tasks")
    fields = {"comm": (t.offsetof(k, "comm"), t.member_size(k, "comm")),
              "pid": (t.offsetof(k, "pid"), 4), "tasks": (tasks_off, 8),
              "node": (node_off, 8), "stack": (t.offsetof(k, "stack"), 8)}
    if group:
        fields["signal"] = (t.offsetof(k, "signal"), 8)
        head_off = t.offsetof("struct signal_struct", "thread_head")
    sp = next((p for p in _SAVED_SP if t.has_member(k, p)), None)
    if sp is not None:
        fields["sp"] = (t.offsetof(k, sp), 8)
    lo = min(o for o, _ in fields.values())
    hi = max(o + n for o, n in fields.values())
    read: dict[int, tuple[Thread, dict[str, bytes]]] = {}
    next_of = Links(kernel)

    def thread(address: int) -> tuple[Thread, dict[str, bytes]]:
        if address not in read:
            raw = kernel.read(address + lo, hi - lo)
            f = {name: raw[o - lo:o - lo + n] for name, (o, n) in fields.items()}
            next_of.known[address + tasks_off] = _u64(f["tasks"])
            next_of.known[address + node_off] = _u64(f["node"])
            read[address] = (Thread(_task(address, f["comm"], f["pid"]), _u64(f["stack"]),
                                    _u64(f["sp"]) if "sp" in f else None), f)
        return read[address]

    init = kernel.sym("init_task")
    leaders = chain([init], (node - tasks_off
                             for node in list_nodes(kernel, init + tasks_off, limit, next_of)))
    for address in leaders:
        leader, f = thread(address)
        if address == init or (group and not _u64(f["signal"])):
            yield leader
            continue
        head = _u64(f["signal"]) + head_off if group else address + node_off
        for node in list_nodes(kernel, head, limit, next_of):
            yield thread(node - node_off)[0]


def _u64(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def thread_size(kernel) -> int:
    """THREAD_SIZE: the size of init_task's stack (INIT_TASK_DATA in the linker
    script), else 16 KiB as on x86_64 and arm64 without KASAN."""
    start, end = kernel.symbols.get("__start_init_task"), kernel.symbols.get("__end_init_task")
    if start is not None and end is not None and 0 < end - start <= 1 << 20:
        return end - start
    return 16384


def stack(kernel, address: int) -> int:
    """Lowest address of a task's kernel stack (task->stack)."""
    return kernel.read_u64(address + kernel.types.offsetof("struct task_struct", "stack"))


# Where a task that is not running saved its stack pointer: x86_64 thread.sp,
# arm64 thread.cpu_context.sp.
_SAVED_SP = ("thread.sp", "thread.cpu_context.sp")


def saved_sp(kernel, address: int) -> int | None:
    """The stack pointer a switched-out task saved (None if the kernel has no field
    we know): below it, the task's stack holds nothing live."""
    for path in _SAVED_SP:
        if kernel.types.has_member("struct task_struct", path):
            return kernel.read_u64(address + kernel.types.offsetof("struct task_struct", path))
    return None
