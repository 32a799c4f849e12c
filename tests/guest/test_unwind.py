"""Unwinding saved stack snapshots on real guests, checked against drgn.

drgn unwinds with the same kind of data as the kernel (ORC on x86_64, DWARF CFI
and frame pointers on arm64) but reads the live stack; we read only a copy of it.

How drgn's traces are compared (`drgn_pcs`): inline frames share a PC and are
counted once; user-space PCs (drgn follows a syscall's pt_regs into user space,
kmemleak-style traces end at the entry code) are dropped; and drgn's trace is
cut after the first frame it cannot name: it has no debug info for a module's
init text while the module is still loading (it names leaky_init, but its next
frame is leaky_init+0x0, not a return address), and unwinds past such a frame by
guesswork.
"""

import time

import pytest

from qemuleak.guest import Guest
from qemuleak.kernel import modules
from qemuleak.kernel.kernel import Kernel
from qemuleak.kernel.symbols import SymbolTable
from qemuleak.unwind import module_text, unwinder_for

pytestmark = pytest.mark.guest

THREAD_SIZE = 16384          # x86_64 and arm64 kernel stacks (no KASAN)
SNAPSHOT = 4096              # what the tracer saves at an allocation


def snapshot(guest: Guest, start: int, size: int) -> bytes:
    """Up to `size` bytes from `start`, stopping where the mapping ends."""
    parts, at = [], start
    while at < start + size:
        n = min(4096 - (at & 4095), start + size - at)
        try:
            parts.append(guest.read(at, n))
        except Exception:
            break
        at += n
    return b"".join(parts)


def drgn_pcs(trace, blind=()) -> list[int]:
    """drgn's PCs, up to where it unwinds by guesswork: a frame it cannot name or
    one in the `blind` ranges (a loading module's init text)."""
    pcs = []
    for frame in trace:
        if frame.pc >> 63 == 0:                 # user space
            break
        if not pcs or pcs[-1] != frame.pc:      # inline frames: one PC
            pcs.append(frame.pc)
        if frame.name is None or any(lo <= frame.pc < hi for lo, hi in blind):
            break
    return pcs


def show(symbols, ours, theirs) -> str:
    rows = [f"  {symbols.format(a) if a else '-':50} | {symbols.format(b) if b else '-'}"
            for a, b in zip(ours + [None] * len(theirs), theirs + [None] * len(ours))
            if a or b]
    return "ours | drgn\n" + "\n".join(rows)


# -- a blocked task's saved context, per arch ----------------------------------

def _x86_context(kernel, task: int) -> tuple[dict, int]:
    # thread.sp points at the struct inactive_task_frame that __switch_to_asm
    # pushed: its bp and return address (into __schedule) start the unwind.
    t = kernel.types
    sp = kernel.read_u64(task + t.offsetof("struct task_struct", "thread.sp"))
    rip = kernel.read_u64(sp + t.offsetof("struct inactive_task_frame", "ret_addr"))
    rbp = kernel.read_u64(sp + t.offsetof("struct inactive_task_frame", "bp"))
    base = sp + t.sizeof("struct inactive_task_frame")
    return {"rip": rip, "rsp": base, "rbp": rbp}, base


def _arm64_context(kernel, task: int) -> tuple[dict, int]:
    t = kernel.types
    ctx = {r: kernel.read_u64(task + t.offsetof("struct task_struct", f"thread.cpu_context.{r}"))
           for r in ("fp", "sp", "pc")}
    return {"pc": ctx["pc"], "sp": ctx["sp"], "x29": ctx["fp"]}, ctx["sp"]


TASK_CONTEXT = {"x86_64": _x86_context, "arm64": _arm64_context}


# -- a stopped vCPU as a drgn struct pt_regs, per arch --------------------------

_X86_PT_REGS = {"r15": "r15", "r14": "r14", "r13": "r13", "r12": "r12", "bp": "rbp",
                "bx": "rbx", "r11": "r11", "r10": "r10", "r9": "r9", "r8": "r8", "ax": "rax",
                "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi", "ip": "rip", "cs": "cs",
                "flags": "eflags", "sp": "rsp", "ss": "ss"}

PT_REGS = {
    "x86_64": lambda regs: {f: regs.get(r, 0) for f, r in _X86_PT_REGS.items()},
    "arm64": lambda regs: {"regs": [regs[f"x{i}"] for i in range(31)], "sp": regs["sp"],
                           "pc": regs["pc"], "pstate": regs.get("cpsr", 0)},
}


def drgn_trace_of_vcpu(prog, arch: str, regs: dict, blind=()) -> list[int]:
    import drgn
    return drgn_pcs(prog.stack_trace(drgn.Object(prog, "struct pt_regs",
                                                 value=PT_REGS[arch](regs))), blind)


# -- blocked tasks ------------------------------------------------------------------

@pytest.mark.series("6.1", "6.12")
def test_blocked_tasks_unwind_like_drgn(leaky_vm, guest_image, arch):
    from drgn.helpers.linux.pid import for_each_task
    with Guest.connect(leaky_vm.gdb_target, ram_path=leaky_vm.ram_fd_path()) as g:
        kernel = Kernel.open(g, vmlinux=guest_image.vmlinux)
        unwinder = unwinder_for(kernel)
        assert unwinder.module_names == ["leaky"]
        prog = kernel.drgn_program([guest_image.module("leaky")])
        [leaky] = modules.for_each_module(kernel)
        symbols = SymbolTable.merge([kernel.symbols, modules.module_symbols(kernel, leaky)])
        stack_off = kernel.types.offsetof("struct task_struct", "stack")
        compared: dict[str, int] = {}
        running: set[str] = set()
        for task in for_each_task(prog):
            comm = task.comm.string_().decode()
            if task.on_cpu.value_():
                running.add(comm)                # its saved context is stale
                continue
            theirs = drgn_pcs(prog.stack_trace(task))
            regs, base = TASK_CONTEXT[arch](kernel, task.value_())
            top = kernel.read_u64(task.value_() + stack_off) + THREAD_SIZE
            assert 0 < top - base <= THREAD_SIZE, comm
            stack = snapshot(g, base, top - base)
            ours = unwinder.unwind(regs, base, stack, max_frames=64, at_entry=False)
            assert ours == theirs, f"{comm}: " + show(symbols, ours, theirs)
            compared[comm] = len(ours)
            if comm == "leaky_sleeper":
                names = [symbols.format(pc).split("+")[0] for pc in ours]
                assert names.index("schedule") < names.index("schedule_timeout") \
                    < names.index("sleeper_fn") < names.index("kthread"), names
                assert symbols.format(ours[names.index("sleeper_fn")]).endswith(" [leaky]")
                # 6.7 (x86): ret_from_fork_asm calls the C ret_from_fork
                assert names[-1] in ("ret_from_fork", "ret_from_fork_asm"), names
                # A snapshot cut short gives the frames it holds, then stops.
                for n in (0, 64, 256, 1024):
                    cut = unwinder.unwind(regs, base, stack[:n], max_frames=64, at_entry=False)
                    assert cut == ours[:len(cut)]
                assert len(unwinder.unwind(regs, base, stack[:64], at_entry=False)) < len(ours)
        # A task on a vCPU at the freeze has no saved context to compare; at most one
        # per vCPU, and any of these may be the one (CI once froze ksoftirqd/0 running).
        assert len(running) <= 2, running
        wanted = {"leaky_sleeper", "kthreadd", "ksoftirqd/0", "ksoftirqd/1"}
        assert wanted - running <= set(compared), (wanted, running)
        assert len(compared) >= 30, compared
        print(f"\n{arch}: {len(compared)} blocked tasks, {sum(compared.values())} frames, "
              f"all equal to drgn's")


# -- an allocation breakpoint ---------------------------------------------------

@pytest.mark.series("6.1", "6.12")
def test_allocation_breakpoint_trace(boot, guest_image, arch):
    """Stop at kmalloc's entry (the tracer's ftrace-NOP breakpoint) while leaky's
    init runs; unwind a 4 KiB snapshot of the stopped vCPU's stack."""
    vm = boot(smp=2)
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as g:
        kernel = Kernel.open(g, vmlinux=guest_image.vmlinux)
        kind, pc_reg, sp_reg = g.arch.breakpoint_kind, g.arch.pc_reg, g.arch.sp_reg
        # First stop: the module is loaded, its init not yet run.
        init_module = kernel.sym("do_init_module")
        g.rsp.insert_breakpoint(init_module, kind)
        vm.send_line("insmod /modules/leaky.ko")
        g.resume()
        stop = g.rsp.wait_stop(30)
        assert g.registers(g.cpus().index(stop.thread))[pc_reg] == init_module
        g.rsp.remove_breakpoint(init_module, kind)
        unwinder = unwinder_for(kernel)            # leaky's unwind data, init text included
        assert unwinder.module_names == ["leaky"]
        [leaky] = modules.for_each_module(kernel)
        symbols = SymbolTable.merge([kernel.symbols, modules.module_symbols(kernel, leaky)])
        prog = kernel.drgn_program([guest_image.module("leaky")])
        core_text, init_text = module_text(kernel, leaky).ranges    # (start, end) each
        # the init text starts with leaky_init, or with what newer kernels put before
        # every function: x86 CALL_PADDING's 16 bytes (6.2+), arm64's ftrace_ops
        # pointer for DYNAMIC_FTRACE_WITH_CALL_OPS (6.4+)
        starts = [a for a in range(init_text[0], init_text[0] + 17, 4)
                  if (sym := symbols.lookup(a)) is not None and sym.address == a]
        assert starts and symbols.lookup(starts[-1]).name == "leaky_init", \
            [symbols.format(a) for a in range(init_text[0], init_text[0] + 17, 4)]

        probes = {}
        # 6.1's kmalloc entries, or 6.12's (*_noprof, 6.10; __kmalloc_cache_noprof, 6.11)
        entries = [n for n in ("kmalloc_trace", "__kmalloc", "__kmalloc_cache_noprof",
                               "__kmalloc_noprof") if kernel.symbols.get(n) is not None]
        assert len(entries) == 2, entries
        for name in entries:
            address = kernel.sym(name)
            offset, length = g.arch.entry_nop(g.read(address, 16))
            probes[address + offset] = length
            g.rsp.insert_breakpoint(address + offset, kind)
        pc_regnum = next(r.regnum for r in g.layout if r.name == pc_reg)
        compared = []
        for _ in range(500):
            g.resume()
            stop = g.rsp.wait_stop(30)
            regs = dict(g.registers(g.cpus().index(stop.thread)))
            assert regs[pc_reg] in probes
            stack = snapshot(g, regs[sp_reg], SNAPSHOT)
            ours = unwinder.unwind(regs, regs[sp_reg], stack)
            theirs = drgn_trace_of_vcpu(prog, arch, regs, blind=[init_text])
            compare_with_drgn(unwinder, symbols, regs, ours, theirs, blind=[init_text])
            compared.append(len(theirs))
            names = symbols.format_many(ours)
            if any(n.endswith(" [leaky]") for n in names):
                break
            # Not leaky's: step over the NOP as the tracer does, and go on.
            g.rsp.write_register(pc_regnum, (regs[pc_reg] + probes[regs[pc_reg]]).to_bytes(8, "little"),
                                 stop.thread)
        else:
            pytest.fail("no allocation from leaky's init in 500 stops")
        for address in probes:
            g.rsp.remove_breakpoint(address, kind)

        functions = [n.split("+")[0] for n in names]
        text = "\n".join(names)
        assert functions[0] in entries, text
        assert "make_leaks" in functions, text
        assert names[functions.index("make_leaks")].endswith(" [leaky]")
        assert "leaky_init" in functions, text                 # init text, while loading
        assert functions.index("leaky_init") < functions.index("do_one_initcall") \
            < functions.index("do_init_module"), text
        assert len(ours) <= 16

        start = time.perf_counter()
        for _ in range(1000):
            unwinder.unwind(regs, regs[sp_reg], stack)
        per_unwind = (time.perf_counter() - start) / 1000
        assert per_unwind < 5e-3
        print(f"\n{arch}: {len(compared)} stops compared with drgn ({sum(compared)} frames); "
              f"{len(ours)} frames in {per_unwind * 1e6:.1f} us:\n{text}")
    vm.wait_for_line("leaky: ready", timeout=60)           # the guest went on


def compare_with_drgn(unwinder, symbols, regs, ours, theirs, blind=()) -> None:
    """Our trace of a vCPU stopped at a function's entry against drgn's.

    arm64: drgn finds no CFI at the patched ftrace NOPs of a function's entry and
    falls back to the frame pointer, which skips the caller whose return address
    is still in x30 alone; so drgn's trace is ours without that frame."""
    if "x30" in regs:
        assert ours[1] == unwinder.strip(regs["x30"])
        ours = ours[:1] + ours[2:]
    n = min(len(ours), len(theirs))
    # at least 3 frames in common, unless drgn stopped sooner in the `blind` ranges
    stopped_blind = n == len(theirs) >= 2 and any(lo <= theirs[-1] < hi for lo, hi in blind)
    assert (n >= 3 or stopped_blind) and ours[:n] == theirs[:n], show(symbols, ours, theirs)
