"""What differs between guest architectures, behind one small interface.

Each architecture is one `Arch` subclass in its own module; code elsewhere asks
`get_arch(name)` (or `arch_of_target_xml`) and calls its methods instead of testing
names.
"""

from ..errors import QemuleakError
from ..pagetable import PagingFormat


class Arch:
    """Facts about one guest architecture."""

    name: str                       # our name: "x86_64", "arm64"
    debian_arch: str                # Debian's name, for packages: "amd64", "arm64"
    gdb_arch: str                   # <architecture> in the gdbstub's target.xml
    qemu_binary: str                # "qemu-system-x86_64"
    machine_args: tuple[str, ...]   # -M arguments
    default_cpu: str                # -cpu model under TCG
    console: str                    # kernel console device: "ttyS0"
    ram_base: int                   # guest-physical address where RAM starts
    kbuild_args: tuple[str, ...] = ()   # extra make arguments for modules
    pc_reg: str                     # register names in the target description
    sp_reg: str
    kernel_window: tuple[int, int]  # where the kernel image may be mapped (KASLR range)
    system_regs: tuple[str, ...] = ()   # registers outside the `g` packet that we need
    # calling convention, for breakpoint stops at a function's first instruction
    arg_regs: tuple[str, ...]       # integer arguments, in order
    return_reg: str                 # integer return value
    breakpoint_kind: int            # the `kind` of Z0/z0 packets
    trace_system_regs: tuple[str, ...] = ()   # system registers the tracer needs per stop

    def kernel_root_candidates(self, regs: dict[str, int]) -> list[int]:
        """Guest-physical addresses that may hold the kernel's top-level page table,
        given one vCPU's registers (the fullest one of all vCPUs wins)."""
        raise NotImplementedError

    def return_site(self, regs: dict[str, int], read_u64) -> tuple[int, int]:
        """(return address, stack pointer after the return) at a function's first
        instruction: where to break to see its result, and how to tell that stop
        from other calls returning there."""
        raise NotImplementedError

    def entry_nop(self, code: bytes) -> tuple[int, int] | None:
        """(offset, length) of the NOP that ftrace leaves near a function's start,
        given the function's first bytes; None if there is none.

        A breakpoint there needs no single-step to get past: the tracer moves the
        PC over the NOP instead of executing it."""
        return None

    def kernel_root_fallbacks(self, root: int) -> list[int]:
        """Where the kernel's tables may be when `root` maps almost nothing."""
        return []

    def paging_format(self, regs: dict[str, int]) -> PagingFormat:
        """The page-table layout this vCPU uses for the kernel half."""
        raise NotImplementedError

    def in_kernel(self, regs: dict[str, int]) -> bool:
        """Was this vCPU running kernel code when it stopped?"""
        raise NotImplementedError

    def percpu_base(self, regs: dict[str, int]) -> int | None:
        """This vCPU's per-CPU offset (__per_cpu_offset[cpu]) as its registers hold it."""
        return None

    def current_task(self, regs: dict[str, int]) -> int | None:
        """The running task_struct, when a register holds it."""
        return None

    def module_windows(self, stext: int, numbers: dict[str, int]) -> list[tuple[int, int]]:
        """Virtual ranges where module memory may be, given the kernel's _stext and
        vmcoreinfo NUMBERs (used only when the `modules` symbol is unknown)."""
        return []

    def untag(self, address: int) -> int:
        """A kernel pointer with any tag bits removed."""
        return address

    def vmemmap(self, kernel) -> int | None:
        """Address of the struct page of page frame 0, None if unknown."""
        return None

    def linear_offset(self, kernel) -> int | None:
        """Where the kernel maps all of RAM: virtual = physical + this (mod 2**64),
        None if unknown."""
        return None

    def untag_words(self, words):
        """`untag` over a numpy array of words (the scanner's hot loop)."""
        return words

    def __repr__(self) -> str:
        return f"<Arch {self.name}>"


def all_arches() -> list[Arch]:
    from . import arm64, x86_64
    return [x86_64.ARCH, arm64.ARCH]


def get_arch(name: str) -> Arch:
    """The Arch called `name` (aliases: amd64, x86-64, aarch64)."""
    known = {a.name: a for a in all_arches()}
    aliases = {"amd64": "x86_64", "x86-64": "x86_64", "aarch64": "arm64"}
    arch = known.get(aliases.get(name, name))
    if arch is None:
        raise QemuleakError(f"unknown architecture {name!r}",
                            f"use one of: {', '.join(sorted(known))}")
    return arch


def arch_of_target_xml(architecture: str) -> Arch:
    """The Arch whose gdbstub reports `architecture` (e.g. "i386:x86-64")."""
    for arch in all_arches():
        if architecture == arch.gdb_arch:
            return arch
    raise QemuleakError(f"unsupported guest architecture {architecture!r}",
                        "qemuleak supports x86_64 and arm64 guests")
