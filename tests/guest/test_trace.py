"""The tracer on real guests: every allocation leaky makes is recorded with its
address, size, comm, pid and caller; frees remove entries; whatever way tracing
ends, the guest runs on with no breakpoint left."""

import re
import signal
import subprocess
import sys
import time

import pytest

from qemuleak.guest import Guest
from qemuleak.kernel.kernel import Kernel
from qemuleak.kernel.modules import Symbolizer
from qemuleak.objects import Flags, Kind, ObjectTable
from qemuleak.session import unwinding
from qemuleak.tracer import Tracer, tracing
from tests.groundtruth import LEAKY_SIZES, parse_objects

pytestmark = pytest.mark.guest

KINDS = {"cache_leak": Kind.CACHE, "vmalloc_leak": Kind.VMALLOC, "percpu_leak": Kind.PERCPU,
         "kvmalloc_big": Kind.VMALLOC}
# The functions of leaky.c in each object's backtrace, innermost first, and who runs them.
CALLERS = {"kmalloc_leak": ("alloc_named", "make_leaks", "leaky_init"),
           "cache_leak": ("make_leaks", "leaky_init"),
           "vmalloc_leak": ("make_leaks", "leaky_init"),
           "list_head": ("make_leaks", "leaky_init"),
           "backtrace_leak": ("backtrace_alloc", "make_leaks", "leaky_init"),
           "bss_kept": ("alloc_named", "make_kept", "leaky_init"),
           "percpu_kept": ("alloc_named", "make_kept", "leaky_init"),
           "kvmalloc_small": ("make_kept", "leaky_init"),
           "kvmalloc_big": ("make_kept", "leaky_init"),
           "interior_kept": ("alloc_named", "make_kept", "leaky_init"),
           "krealloc_grown": ("make_leaks", "leaky_init"),
           "krealloc_moved": ("make_leaks", "leaky_init"),
           "percpu_leak": ("make_leaks", "leaky_init"),
           "rcu_freed": ("make_leaks", "leaky_init"),
           "softirq_kept": ("soft_fn",),
           "hardirq_kept": ("hard_fn",),
           "stack_kept": ("alloc_named", "sleeper_fn"),
           "register_kept": ("alloc_named", "spinner_fn")}
COMMS = {"stack_kept": "leaky_sleeper", "register_kept": "leaky_spinner",
         "softirq_kept": "softirq", "hardirq_kept": "hardirq"}
FLAGS = {"softirq_kept": Flags.SOFTIRQ, "hardirq_kept": Flags.HARDIRQ}


class RecordingTable(ObjectTable):
    """An ObjectTable that remembers what was freed, for the test to look at: the
    last record freed at each address, and every freed record's seq."""

    def __init__(self):
        super().__init__()
        self.freed = {}
        self.freed_seqs = set()

    def remove(self, address):
        record = super().remove(address)
        if record is not None:
            self.freed[address] = record
            self.freed_seqs.add(record.seq)
        return record


def trace_until(vm, guest, kernel, table, marker: str, timeout: float = 120,
                symbolizer=None, entry: str = "auto") -> Tracer:
    tracer = Tracer(kernel, table, **unwinding(kernel, symbolizer), entry=entry)
    start = time.monotonic()
    with tracing(tracer):
        tracer.run(lambda: marker in vm.console_text()[vm_mark(vm):]
                   or time.monotonic() - start > timeout)
    assert marker in vm.console_text(), f"guest never printed {marker!r}"
    return tracer


FRAME = re.compile(r"^\[\s*[\d.]+\]\s+([\w.]+\+0x[0-9a-f]+/0x[0-9a-f]+(?: \[\w+\])?)\s*$", re.M)


def dump_stack_frames(console: str) -> list[str]:
    """The frames leaky's dump_stack() printed, without the unreliable '?' ones."""
    start = console.index("leaky: dump_stack before backtrace_leak")
    end = console.index("obj backtrace_leak", start)
    return FRAME.findall(console[start:end])


def vm_mark(vm) -> int:
    return getattr(vm, "_trace_mark", 0)


def guest_alive(vm, tag: str) -> None:
    """The guest runs and allocates: a command that makes the kernel allocate."""
    vm.send_line(f"cat /proc/slabinfo > /dev/null; ls /sys/kernel/slab > /dev/null; echo {tag}-$((2+3))")
    vm.wait_for_line(f"{tag}-5", timeout=30)


# "step": breakpoints on each function's first instruction, stepped with the
# breakpoint in place, as on a kernel without ftrace's NOPs
@pytest.mark.parametrize("entry", ["auto", "step"])
@pytest.mark.series("6.1", "6.12")
def test_leaky_allocations_and_frees(boot, guest_image, arch, entry):
    vm = boot(files={"dc": b"echo 3 > /proc/sys/vm/drop_caches\n"})
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
        kernel = Kernel.open(guest, system_map=guest_image.system_map)
        table = RecordingTable()
        symbols = Symbolizer(kernel)
        vm.send_line("insmod /modules/leaky.ko")
        tracer = trace_until(vm, guest, kernel, table, "leaky: ready", symbolizer=symbols,
                             entry=entry)
        if entry == "step":
            assert tracer.stepped == sorted(p.name for p in tracer.probes.values())
        console = vm.console_text()
        objs = parse_objects(console)
        insmod_pid = int(re.search(r"PID: (\d+) Comm: insmod", console).group(1))
        leaky_records = {}
        for name, size in LEAKY_SIZES.items():
            # rcu_freed may be freed (a kfree_rcu batch runs when guest time says so:
            # sooner on a loaded host) and its memory taken by another allocation
            # before tracing stops: then the freed record is leaky's
            records = [x for x in (table.get(objs[name].address),
                                   table.freed.get(objs[name].address)) if x is not None]
            r = next((x for x in records if x.comm == COMMS.get(name, "insmod")),
                     records[0] if records else None)
            assert r is not None, f"{name} at {objs[name].address:#x} not traced"
            leaky_records[name] = r
            assert r.pid == 0 if name in FLAGS else r.pid > 0, name
            assert r.flags == FLAGS.get(name, 0), name
            assert (r.size, r.kind) == (size, KINDS.get(name, Kind.KMALLOC)), name
            assert r.comm == COMMS.get(name, "insmod"), name
            if r.comm == "insmod":
                assert r.pid == insmod_pid, name
            frames = [symbols.format(pc) for pc in r.backtrace]
            assert frames[0].split("+")[0] in {p.name for p in tracer.probes.values()}
            leaky_frames = [f.split("+")[0] for f in frames if f.endswith(" [leaky]")]
            assert leaky_frames, (name, frames)
            if name in CALLERS:       # alloc_named is static: the compiler may inline it
                assert [f for f in leaky_frames if f != "alloc_named"] == \
                    [f for f in CALLERS[name] if f != "alloc_named"], (name, frames)
            if r.comm == "insmod":                  # then the module loader, as in dump_stack
                assert any(f.startswith("do_init_module+") for f in frames), (name, frames)
        assert tracer.stats.allocs >= len(LEAKY_SIZES)
        # kvzalloc: the small object from kmalloc (kvmalloc_node tail-calls it, so
        # its frame is gone, as in the kernel's own backtraces), the big one from
        # vmalloc, after kmalloc said no: a NULL return, no object
        assert tracer.stats.null_returns >= 1 and table.get(0) is None
        assert not guest.rsp.breakpoints

        # kfree_rcu: the free is recorded when RCU really frees it, a grace period on.
        # Batches wait 5 s of guest time (which stands still at every stop); memory
        # pressure drains them at once: drop_caches runs the kfree_rcu shrinker.
        # (It may be freed already, its memory taken again: that record is not leaky's.)
        rcu = objs["rcu_freed"].address
        rcu_seq = leaky_records["rcu_freed"].seq
        vm.send_line("sh /dc")            # short: the guest is stopped, its UART small
        start = time.monotonic()
        tracer = Tracer(kernel, table, **unwinding(kernel, symbols), entry=entry)
        with tracing(tracer):
            tracer.run(lambda: rcu_seq in table.freed_seqs or time.monotonic() - start > 60)
        assert rcu_seq in table.freed_seqs
        assert table.get(rcu) is None or table.get(rcu).seq != rcu_seq     # (memory reused)

        # The allocation right after leaky's dump_stack(): from its caller on, our
        # backtrace is the kernel's, frame for frame (names, offsets, sizes).
        ours = [symbols.format(pc) for pc in table.get(objs["backtrace_leak"].address).backtrace]
        printed = dump_stack_frames(console)
        at_ours = next(i for i, f in enumerate(ours) if f.startswith("backtrace_alloc+"))
        at_printed = next(i for i, f in enumerate(printed) if f.startswith("backtrace_alloc+"))
        ours, printed = ours[at_ours + 1:], printed[at_printed + 1:]
        n = min(len(ours), len(printed))
        assert n >= 5 and ours[:n] == printed[:n], (ours, printed)

        # Module exit frees all but exit_leak, which rmmod allocates. A freed
        # object's memory may hold a new object by then: not the same record.
        seqs = {name: table.get(objs[name].address).seq for name in LEAKY_SIZES
                if name != "rcu_freed"}
        vm._trace_mark = len(vm.console_text())
        vm.send_line("rmmod leaky")
        trace_until(vm, guest, kernel, table, "leaky: exit", entry=entry)
        objs = parse_objects(vm.console_text())
        for name in seqs:
            r = table.get(objs[name].address)
            assert r is None or r.seq != seqs[name], f"{name} not freed in the table"
        exit_leak = table.get(objs["exit_leak"].address)
        assert exit_leak is not None and (exit_leak.size, exit_leak.comm) == (64, "rmmod")
    guest_alive(vm, "after-trace")


def test_interrupted_tracing_leaves_the_guest_running(boot, guest_image):
    """Ctrl-C (SIGINT) and SIGTERM to `qemuleak trace`: breakpoints out, guest on."""
    vm = boot(modules=())
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = subprocess.Popen([sys.executable, "-m", "qemuleak.cli", "trace", vm.gdb_target,
                              "--system-map", str(guest_image.system_map), "--duration", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        err = ""
        while "tracing" not in err and time.monotonic() < deadline:
            err += p.stderr.readline()
        vm.send_line("ls /proc > /dev/null")     # some allocations while traced
        time.sleep(2)
        p.send_signal(sig)
        out, rest = p.communicate(timeout=60)
        assert p.returncode == 130, rest
        assert "Traceback" not in rest
        assert "allocations" in out
        guest_alive(vm, f"after-{sig.name}")


def test_sigkill_leaves_the_guest_stopped_and_resume_recovers(boot, guest_image):
    """What QEMU does when the tracer dies: the guest stays stopped and QEMU keeps
    its breakpoints (on every vCPU but the one a reconnecting debugger's `?`
    clears); `qemuleak resume` drops them all and lets it run."""
    vm = boot(modules=())
    p = subprocess.Popen([sys.executable, "-m", "qemuleak.cli", "trace", vm.gdb_target,
                          "--system-map", str(guest_image.system_map), "--duration", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    while "tracing" not in err:
        err += p.stderr.readline()
    vm.send_line("ls /proc > /dev/null")
    time.sleep(2)
    p.kill()
    p.wait()
    time.sleep(1)
    # (Typing to a stopped guest would overflow its UART: ask QEMU instead.)
    assert vm.qmp("query-status")["return"]["running"] is False
    r = subprocess.run([sys.executable, "-m", "qemuleak.cli", "resume", vm.gdb_target],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert vm.qmp("query-status")["return"]["running"] is True
    guest_alive(vm, "resumed")
