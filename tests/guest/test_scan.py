"""The scanner on real guests: leaky's leaks found at their addresses, its kept
objects not reported, an idle guest clean, reports in every format. The tests
with a `session` run in both provenance modes: breakpoints on every allocation,
and SLUB's allocation tracks (the guest booted with slub_debug=U,kmalloc-*)."""

import json
import re
import signal
import subprocess
import sys
import time

import jsonschema
import pytest

from tests.groundtruth import LEAKY_LEAKS, LEAKY_SIZES, parse_objects
from qemuleak import provenance, report
from qemuleak.guest import Guest
from qemuleak.kernel.kernel import Kernel
from qemuleak.kernel.modules import Symbolizer, for_each_module
from qemuleak.objects import Kind, ObjectTable
from qemuleak.scan import Options, scan
from qemuleak.snapshot import freeze
from qemuleak.session import unwinding
from qemuleak.tracer import tracing

KEPT = {"bss_kept", "percpu_kept", "interior_kept", "stack_kept", "register_kept",
        "softirq_kept", "hardirq_kept"}
LIST_NODES = {"list_node1", "list_node2", "list_node3", "list_node4"}


class Session:
    """A guest traced from before the workload on, scanned on demand."""

    def __init__(self, vm, guest_image, mode: str = "breakpoints"):
        self.vm = vm
        self.guest = Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path())
        self.kernel = Kernel.open(self.guest, system_map=guest_image.system_map)
        self.table = ObjectTable()
        self.symbols = Symbolizer(self.kernel)
        # the tracks guest must keep them: asked for explicitly, not "auto"
        self.mode = provenance.choose(self.kernel, mode)
        w = provenance.watch(self.kernel, self.mode, self.table,
                             **unwinding(self.kernel, self.symbols))
        self.tracer, self.sync = w.tracer, w.sync
        self._n = 0

    def run(self, command: str, marker: str, settle: float = 2.0, timeout: float = 120) -> None:
        """Trace while the guest runs `command` until `marker`, then a shell round
        trip and `settle` seconds more (the command's process has exited)."""
        self._n += 1
        done = f"step{self._n}-$((1+1))"
        start = time.monotonic()
        with tracing(self.tracer):
            for line, expect in ((command, marker), (f"echo {done}", done.replace("$((1+1))", "2"))):
                if line:
                    self.vm.send_line(line)
                mark = len(self.vm.console_text())
                self.tracer.run(lambda: expect in self.vm.console_text()[mark - 200:]
                                or time.monotonic() - start > timeout)
                assert expect in self.vm.console_text(), f"guest never printed {expect!r}"
            t = time.monotonic()
            self.tracer.run(lambda: time.monotonic() - t > settle)
        self.guest.was_running = True

    def scan_until(self, found, tries: int = 3, **options):
        """syzkaller's way to trust a report: scan; if `found(result)` is not yet
        true, let the guest run a command (stale registers and stack words get
        overwritten) and scan again."""
        for i in range(tries):
            result = self.scan(**options)
            if found(result) or i == tries - 1:
                return result
            self.run(f"echo again{i}", f"again{i}", settle=1.0)

    def scan(self, **options):
        """One scan; leaks the kernel marks kmemleak_not_leak() (report.KERNEL_NOT_LEAKS,
        which only tracks show from before tracing) left out of `leaks`."""
        snapshot = freeze(self.guest)
        inventory = self.sync(snapshot) if self.sync is not None else None
        result = scan(self.kernel, self.table, snapshot, Options(**options), self.symbols,
                      self.tracer.freed, inventory)
        result.leaks = report.filter_leaks(result.leaks)[0]
        return result

    def close(self):
        self.guest.close()


@pytest.fixture(params=["breakpoints", "tracks"])
def mode(request) -> str:
    return request.param


def boot_append(mode: str) -> str:
    """The kernel command line a guest of this provenance mode boots with."""
    return provenance.RUN_SLUB_DEBUG if mode == "tracks" else ""


@pytest.fixture
def session(boot, guest_image, mode):
    sessions = []

    def _session(vm=None, **config):
        s = Session(vm or boot(append=boot_append(mode), **config), guest_image, mode)
        sessions.append(s)
        return s
    yield _session
    for s in sessions:
        s.close()


def names(leaks, objs):
    """Leaks by the name leaky gave the object ("?0x..." for anything else)."""
    by_address = {o.address: n for n, o in objs.items()}
    return {by_address.get(leak.address, f"?{leak.address:#x}"): leak for leak in leaks}


def assert_hidden_by_stale_words(result, objs, missing):
    """Leaks a scan did not report must be kmemleak's known blind spot: a stale
    word the kernel left in another task's live stack frame (e.g. kthread()'s
    pointer to its kthread_create_info, freed at boot and reused for a leak of
    leaky's), in a vCPU register, in a static per-CPU variable of the kernel, in
    untracked non-slab memory (a root in the default mode), or in another such
    leak. Nothing leaky keeps, and nothing on the stacks of leaky's own tasks, may
    hide one."""
    hidden = {f"{objs[n].address:#x}" for n in missing}
    ours = ("module leaky", "stack of insmod ", "stack of leaky_")
    why = {n: result.why(objs[n].address) for n in missing}
    for name, reasons in why.items():
        assert reasons, (name, "reported as referenced, but no word points to it")
        for r in reasons:
            if r.startswith(("direct leak", "indirect leak")):
                continue                  # a white referrer keeps nothing
            # (a static per-CPU variable of the kernel: the allocators keep
            # per-CPU caches of pointers to memory they recycle)
            stale = (r.startswith(("stack of ", "a vCPU register", "untracked memory",
                                   "static per-CPU area of CPU "))
                     or r.split()[:2] == ["referenced", "object"] and r.split()[2] in hidden)
            # (what keeps a referrer, so that a failure says what it was)
            referrer = r.split()[2] if r.startswith("referenced object ") else None
            assert stale and not r.startswith(ours), \
                (name, why, referrer and result.why(int(referrer, 16)))
    if missing:
        print("hidden by stale words:", why)


@pytest.mark.series("6.1", "6.12")
def test_leaky_leaks_found_and_kept_objects_not(request, session, arch, mode, series):
    if (arch, mode, series) == ("x86_64", "breakpoints", "6.12"):
        # Failed 2 of 5 runs (2026-12-07): 256-byte objects allocated while tracing,
        # a word at +8 of each, point into percpu_leak's per-CPU cookie, so it is
        # not reported. Not understood yet; visible as XFAIL/XPASS, never hidden.
        request.applymarker(pytest.mark.xfail(reason="6.12 x86_64 breakpoints: percpu_leak "
                                              "referenced by traced objects", strict=False))
    s = session()
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    objs = parse_objects(s.vm.console_text())

    # kmemleak's roots only, the rest of the kernel filtered out: every leak of
    # leaky's (and objects the kernel made for it, e.g. its kthreads', which only
    # memory allocated before tracing points at), none of its kept objects
    # (a dead task's stack waits a grace period before it is freed, its stale
    # frames still pointing at the leaks: rescan, as syzkaller does)
    result = s.scan_until(lambda r: all(r.state_of(objs[n].address)[0] != "referenced"
                                        for n in LEAKY_LEAKS), untracked="ignore")
    leaks, _ = report.filter_leaks(result.leaks, module="leaky")
    found = names(leaks, objs)
    assert_hidden_by_stale_words(result, objs, LEAKY_LEAKS - set(found))
    assert LEAKY_LEAKS & set(found), sorted(found)
    assert not KEPT & set(found), sorted(found)
    for name, leak in found.items():
        if name not in LEAKY_LEAKS:
            continue
        assert leak.size == LEAKY_SIZES[name], name
        assert leak.comm == "insmod" and leak.pid > 0, name
        assert any(f.module == "leaky" for f in leak.backtrace), name
        assert leak.kind == ("indirect" if name in LIST_NODES else "direct"), name
    assert found["percpu_leak"].object_kind == "percpu"
    assert found["vmalloc_leak"].object_kind == "vmalloc"
    assert result.state_of(objs["interior_kept"].address)[0] == "referenced"

    text = report.format_text(leaks)
    obj = objs["kmalloc_leak"]
    assert f"unreferenced object {obj.address:#010x} (size {obj.size}):\n" \
           f'  comm "insmod", pid {found["kmalloc_leak"].pid}, jiffies ' in text
    assert "] make_leaks+0x" in text and " [leaky]\n" in text
    doc = report.to_json([report.Scan("leaky", result.time, result.objects,
                                      result.bytes_scanned, leaks)])
    jsonschema.validate(json.loads(json.dumps(doc)), report.JSON_SCHEMA)

    # Default: untracked non-slab memory is a root, slab objects from before
    # tracing are objects. Whatever it reports must be one of leaky's leaks (no
    # false report from the rest of the kernel), and it misses only what stale
    # words hide.
    result = s.scan()
    found = names(result.leaks, objs)
    assert set(found) <= LEAKY_LEAKS, sorted(found)
    assert "cache_leak" in found, sorted(found)
    assert_hidden_by_stale_words(result, objs, LEAKY_LEAKS - set(found))


def test_stack_off_reports_the_object_only_on_a_stack(session, arch):
    s = session()
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    objs = parse_objects(s.vm.console_text())
    on = names(s.scan(untracked="ignore").leaks, objs)
    stack_kept = objs["stack_kept"].address
    # (a register may still hold it for a while: rescan, as syzkaller does)
    off = names(s.scan_until(lambda r: r.state_of(stack_kept)[0] != "referenced",
                             untracked="ignore", stack=False).leaks, objs)
    assert "stack_kept" not in on
    assert "stack_kept" in off


@pytest.mark.series("6.1", "6.12")
def test_exit_leak_after_rmmod(session, arch):
    s = session()
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    s.run("rmmod leaky", "leaky: exit")
    objs = parse_objects(s.vm.console_text())
    exit_leak = objs["exit_leak"].address
    result = s.scan_until(lambda r: r.state_of(exit_leak)[0] != "referenced", untracked="ignore")
    leaks, _ = report.filter_leaks(result.leaks, module="leaky")
    found = {leak.address for leak in leaks}
    if exit_leak not in found:        # only a stale word (kmemleak's blind spot) may hide it
        assert_hidden_by_stale_words(result, objs, {"exit_leak"})
        return
    assert exit_leak in found, (
        result.state_of(objs["exit_leak"].address), s.table.get(objs["exit_leak"].address),
        [[f.text() for f in leak.backtrace] for leak in result.leaks
         if leak.address == objs["exit_leak"].address])
    exit_leak = next(leak for leak in leaks if leak.address == exit_leak)
    assert exit_leak.comm == "rmmod"
    assert any(f.function == "leaky_exit" for f in exit_leak.backtrace)


def test_objects_freed_while_not_tracing_are_not_reported(session, arch):
    """Tracing stops; the guest goes on and frees what the tracer saw allocated
    (rmmod: leaky frees its leaks and kept objects alike, and destroys its cache).
    The allocators in the snapshot hold that memory free: none of it is a leak.
    (But exit_leak, allocated untraced right after, may take a freed slot, and a
    leak there is reported with the stale record: nothing tells them apart.)"""
    s = session()
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    objs = parse_objects(s.vm.console_text())
    if s.sync is not None:
        s.sync(freeze(s.guest))                      # slab objects enter at a scan
    tracked = {o.address for o in objs.values() if s.table.get(o.address) is not None}
    assert {objs[n].address for n in LEAKY_LEAKS} <= tracked
    s.guest._resume_for_good()                       # tracing left it stopped
    s.vm.send_line("rmmod leaky")                    # not traced
    s.vm.wait_for_line("leaky: exit", timeout=60)
    time.sleep(2)                                    # kfree_rcu and the like
    tracked.discard(parse_objects(s.vm.console_text())["exit_leak"].address)
    for untracked in ("roots", "ignore"):
        result = s.scan(untracked=untracked)
        assert not {leak.address for leak in result.leaks} & tracked, \
            (untracked, sorted(names(result.leaks, objs)), report.format_text(result.leaks))


@pytest.mark.series("6.1", "6.12")
@pytest.mark.parametrize("mode", ["tracks"])
def test_vmalloc_areas_untraced_after_start_come_from_the_scans(session, arch, mode):
    """Tracks mode sets vmalloc's breakpoints only while a module's init runs: the
    module's own memory, vmalloc'd by the loader before that, enters the table
    at the next scan with vmalloc's caller for its story, and leaves it when
    rmmod frees it."""
    s = session()
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    s.scan()
    [leaky] = [m for m in for_each_module(s.kernel) if m.name == "leaky"]
    start = min(a for a, _ in leaky.regions)
    r = s.table.get(start & ~0xFFF)
    assert r is not None and r.kind == Kind.VMALLOC and r.jiffies > 0, r
    [caller] = r.backtrace
    assert s.symbols.table.lookup(caller).name not in ("__vmalloc_node_range",
                                                       "__vmalloc_node_range_noprof")
    assert r.size >= dict(leaky.regions)[start]
    s.run("rmmod leaky", "leaky: exit")
    s.scan()
    assert s.table.get(start & ~0xFFF) is None


@pytest.mark.series("6.1", "6.12")
def test_idle_guest_scanned_repeatedly_reports_nothing(session, arch):
    s = session(modules=())
    for i in range(3):
        s.run(f"ls /proc > /dev/null; echo idle{i}", f"idle{i}", settle=1.0)
        result = s.scan()
        assert result.objects > 0
        assert result.leaks == [], report.format_text(result.leaks)


def test_trace_scan_command(boot, guest_image, tmp_path):
    """`qemuleak trace --scan` on a guest QEMU runs on its own: Ctrl-C ends tracing,
    the scan runs, a JSON report with leaky's leaks (one suppressed), exit code 1."""
    vm = boot(modules=("leaky",))
    out = tmp_path / "report.json"
    supp = tmp_path / "supp"
    supp.write_text("# allocated right after dump_stack(), on purpose\nleak:backtrace_a*\n")
    p = subprocess.Popen([sys.executable, "-m", "qemuleak.cli", "trace", vm.gdb_target,
                          "--system-map", str(guest_image.system_map), "--duration", "0",
                          "--scan", "--format", "json", "--output", str(out),
                          "--module-filter", "leaky", "--untracked", "ignore",
                          "--suppressions", str(supp)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    while "tracing" not in err:
        err += p.stderr.readline()
    vm.send_line("insmod /modules/leaky.ko")
    deadline = time.monotonic() + 120
    while "leaky: ready" not in vm.console_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=120)
    assert "Traceback" not in rest, rest
    assert p.returncode == 1, rest
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, report.JSON_SCHEMA)
    scan_doc = doc["scans"][0]
    objs = parse_objects(vm.console_text())
    found = {int(leak["address"], 16) for leak in scan_doc["leaks"]}
    # (leaky's own cache held nothing before: no stale word can hide cache_leak)
    assert objs["cache_leak"].address in found
    assert objs["backtrace_leak"].address not in found
    assert scan_doc["suppressed"] >= 1
    assert all(leak["module"] == "leaky" for leak in scan_doc["leaks"])
    leak = next(x for x in scan_doc["leaks"] if int(x["address"], 16) == objs["cache_leak"].address)
    assert leak["kind"] == "direct" and leak["size"] == objs["cache_leak"].size


# Two minutes of kernel churn before anyone attaches: files and directories come
# and go in tmpfs, processes fork and exit, a module is loaded and unloaded with
# its kthread allocating, so the kernel holds many objects qemuleak never saw
# allocated, pointing at each other.
BUSY_SCRIPT = b"""
end=$(( $(date +%s) + $1 ))
i=0
while [ $(date +%s) -lt $end ]; do
    i=$((i + 1))
    d=/tmp/busy/$((i % 64))
    mkdir -p $d && echo $i > $d/f$((i % 5)) && rm -f $d/f$(((i + 2) % 5))
    ls -R /proc/self/ > /dev/null 2>&1
    insmod /modules/allocstorm.ko count=3000 && rmmod allocstorm
done
echo busy-$((1+1))-done $i
"""
BUSY_SECONDS = 120


def test_attach_after_minutes_of_churn_reports_only_leakys_leaks(boot, session, arch, mode):
    """Attaching to a guest that has been up and busy for minutes, then loading
    leaky: every leak reported is one of leaky's (the objects the churn left
    behind are scanned, never reported; with tracks they have a history, and
    still none is reported), and cache_leak is among them."""
    vm = boot(modules=("leaky", "allocstorm"), files={"busy.sh": BUSY_SCRIPT},
              append=boot_append(mode))
    vm.send_line(f"sh /busy.sh {BUSY_SECONDS}")
    m = vm.wait_for_line(re.compile(r"busy-2-done (\d+)"), timeout=BUSY_SECONDS + 240)
    assert int(m.group(1)) > 10, m.group(0)             # it really churned
    s = session(vm)
    s.run("insmod /modules/leaky.ko", "leaky: ready")
    objs = parse_objects(s.vm.console_text())
    result = s.scan()
    found = names(result.leaks, objs)
    assert set(found) <= LEAKY_LEAKS, sorted(found)
    assert "cache_leak" in found, sorted(found)
    assert_hidden_by_stale_words(result, objs, LEAKY_LEAKS - set(found))
    assert result.objects > 5000, result.objects   # the churn's objects were scanned
