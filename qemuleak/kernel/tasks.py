"""Tasks: the current task of each vCPU, and a task's comm and pid."""

from dataclasses import dataclass

from ..errors import KernelTypeError, QemuleakError
from .lists import list_nodes

# Per-CPU variables that point at the running task, by what the kernel has:
# x86_64 `current_task` (moved into `pcpu_hot` in 6.2), arm64 `__entry_task`.
_CURRENT_VARS = ("current_task", "__entry_task")


@dataclass(frozen=True)
class Task:
    address: int
    comm: str
    pid: int


def current_task(kernel, cpu: int) -> int:
    """Address of the task_struct running on `cpu`."""
    # A register is exact except right on a kernel entry path, where it may
    # still hold a user value: trust it only if it reads like a task.
    in_reg = kernel.guest.arch.current_task(kernel.guest.registers(cpu))
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
    pid = int.from_bytes(kernel.read(address + pid_off, 4), "little", signed=True)
    return Task(address, comm.split(b"\0", 1)[0].decode("utf-8", "replace"), pid)


def for_each_task(kernel, limit: int = 1 << 20):
    """Every task (thread-group leaders) on init_task's list."""
    t = kernel.types
    tasks_off = t.offsetof("struct task_struct", "tasks")
    yield task(kernel, kernel.sym("init_task"))
    for node in list_nodes(kernel, kernel.sym("init_task") + tasks_off, limit):
        yield task(kernel, node - tasks_off)


def for_each_thread(kernel, limit: int = 1 << 20):
    """Every thread: each leader's thread group, through signal->thread_head and
    thread_node (where they exist) or the older thread_group list."""
    t = kernel.types
    if t.has_member("struct task_struct", "thread_node"):
        node_off = t.offsetof("struct task_struct", "thread_node")
        sig_off = t.offsetof("struct task_struct", "signal")
        head_off = t.offsetof("struct signal_struct", "thread_head")
        heads = lambda leader: kernel.read_u64(leader + sig_off) + head_off   # noqa: E731
    else:
        node_off = t.offsetof("struct task_struct", "thread_group")
        heads = lambda leader: leader + node_off                              # noqa: E731
    for leader in for_each_task(kernel, limit):
        if leader.address == kernel.sym("init_task") or not _has_signal(kernel, leader.address):
            yield leader
            continue
        for node in list_nodes(kernel, heads(leader.address), limit):
            yield task(kernel, node - node_off)


def _has_signal(kernel, address: int) -> bool:
    t = kernel.types
    if not t.has_member("struct task_struct", "thread_node"):
        return True
    return kernel.read_u64(address + t.offsetof("struct task_struct", "signal")) != 0


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
