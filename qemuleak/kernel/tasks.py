"""Tasks: the current task of each vCPU, and a task's comm and pid."""

from dataclasses import dataclass

from ..errors import KernelTypeError, QemuleakError

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
    head = kernel.sym("init_task") + tasks_off
    node = kernel.read_u64(head)
    yield task(kernel, kernel.sym("init_task"))
    seen = 0
    while node != head and seen < limit:
        yield task(kernel, node - tasks_off)
        node = kernel.read_u64(node)
        seen += 1
