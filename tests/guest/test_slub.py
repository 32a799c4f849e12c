"""The SLUB inventory on real guests: what it counts agrees with the guest's own
/proc/slabinfo, and with the tracer, object by object."""

import json
import re
import subprocess
import sys

import jsonschema
import pytest

from qemuleak import report

from qemuleak.errors import QemuleakError
from qemuleak.guest import Guest
from qemuleak.kernel.kernel import Kernel
from qemuleak.kernel import percpu, vmalloc
from qemuleak.kernel.slub import inventory
from qemuleak.snapshot import freeze, guest_frozen
from tests.groundtruth import parse_objects
from tests.guest.test_scan import Session

SLABINFO = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+\d+\s+\d+\s+\d+ : tunables", re.M)


def slabinfo(vm, tag: str) -> dict[str, tuple[int, int]]:
    """name -> (active_objs, num_objs), as the guest prints them now."""
    vm.send_line(f"cat /proc/slabinfo; echo {tag}-$((1+1))")
    m = vm.wait_for_line(f"{tag}-2", timeout=60)
    text = vm.console_text()[:m.start()]
    text = text[text.rfind("# name"):]
    return {n: (int(a), int(t)) for n, a, t in SLABINFO.findall(text)}


@pytest.mark.series("6.1", "6.12")
def test_inventory_counts_agree_with_slabinfo(boot, guest_image):
    vm = boot(modules=())
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
        guest.was_running = True
        kernel = Kernel.open(guest, system_map=guest_image.system_map)
        guest.resume()
        before = slabinfo(vm, "before")
        snap = freeze(guest)
        after = slabinfo(vm, "after")
        with guest_frozen(guest, snap):
            inv = inventory(kernel, snap.ram)
    assert not inv.broken, inv.broken
    ours = {c.name: (int(s - p), int(s)) for c, s, p in zip(inv.caches, inv.slots, inv.partial_free)}
    stable = {n for n in before if before[n] == after.get(n)}
    compared = {n for n in stable if n in ours}
    # SLUB's slabinfo: num_objs = all slots; active_objs = slots - free objects of
    # the slabs on the nodes' partial lists
    assert len(compared) >= 50, (len(compared), sorted(set(before) - set(ours))[:20])
    wrong = {n: (ours[n], before[n]) for n in compared if ours[n] != before[n]}
    assert not wrong, wrong
    # every allocated object is counted once, inside its cache's slots
    assert len(set(inv.addresses.tolist())) == len(inv.addresses)
    assert (inv.slots - inv.free).sum() == len(inv.addresses)


@pytest.mark.series("6.1", "6.12")
def test_inventory_agrees_with_tracer(boot, guest_image):
    """Every slab object the tracer saw allocated (and not freed) is allocated in
    the inventory; every one it saw freed (and not reallocated) is not."""
    s = Session(boot(), guest_image)
    try:
        s.run("insmod /modules/leaky.ko", "leaky: ready")
        objs = parse_objects(s.vm.console_text())
        snap = freeze(s.guest)
        with guest_frozen(s.guest, snap):
            inv = inventory(s.kernel, snap.ram)
            areas = {a: n for a, n, _ in vmalloc.allocations(s.kernel)}
            chunks = percpu.chunk_map(s.kernel)
        assert not inv.broken, inv.broken
        # vmalloc areas and per-CPU areas: every one the tracer holds, at its size
        # as the allocator rounds it: whole pages (2 MiB ones when vmalloc maps
        # the area with huge pages, as kvmalloc asks from 2 MiB on); 4-byte units
        pcpu = dict(zip(chunks.cookies().tolist(), chunks.size.tolist()))
        kinds = {"VMALLOC": (areas, 4096), "PERCPU": (pcpu, 4)}
        others = [(r.kind.name, hex(r.address), r.size) for r in s.table if r.kind.name in kinds]
        assert sum(k == "PERCPU" for k, _, _ in others) >= 1, others

        def rounded(kind, size, got):
            unit = kinds[kind][1] if size < 2 << 20 or got % (2 << 20) else 2 << 20
            return got == -(-size // unit) * unit
        wrong = [(k, a, n, kinds[k][0].get(int(a, 16))) for k, a, n in others
                 if not rounded(k, n, kinds[k][0].get(int(a, 16), -1))]
        assert not wrong, wrong
        assert areas[objs["vmalloc_leak"].address] == 4 * 4096
        assert areas[objs["kvmalloc_big"].address] == 6 << 20
        assert pcpu[objs["percpu_leak"].address] == 48
        allocated = set(inv.addresses.tolist())
        slab = [r for r in s.table if r.kind.name in ("KMALLOC", "CACHE") and r.cache]
        assert len(slab) > 20, len(slab)
        missing = [(hex(r.address), r.size, r.cache) for r in slab if r.address not in allocated]
        assert not missing, missing[:20]
        assert objs["cache_leak"].address in allocated
        freed = [a for a in s.tracer.freed if a in allocated]
        if freed:
            # Only a call caught half way explains these: an allocation that had
            # not returned when tracing stopped (it may have reused a freed
            # address), or a vCPU frozen inside a free (recorded at its entry).
            busy = slab_code_on_cpus(s, snap)
            assert s.tracer.in_flight or busy, [hex(a) for a in freed[:20]]
    finally:
        s.close()


SLAB_CODE = re.compile(r"kmalloc|kfree|kmem_cache|slab|kvfree|kvmalloc")


def slab_code_on_cpus(s, snap) -> list[list[str]]:
    """The backtraces (function names) of the vCPUs frozen in allocator code."""
    from qemuleak.unwind import unwinder_for
    unwinder = unwinder_for(s.kernel)
    unwinder.refresh_modules(s.kernel)
    sp_reg = s.guest.arch.sp_reg
    busy = []
    with guest_frozen(s.guest, snap):
        for regs in snap.registers:
            sp = regs[sp_reg]
            end = (sp | 0x3FFF) + 1                     # 16 KiB aligned stacks
            try:
                stack = s.guest.read(sp, end - sp)
            except QemuleakError:
                stack = b""
            pcs = unwinder.unwind(regs, sp, stack, at_entry=False)
            names = [s.symbols.format(pc).split("+")[0] for pc in pcs]
            if any(SLAB_CODE.search(n) for n in names):
                busy.append(names)
    return busy


def scan_command(vm, guest_image, out, *args, module="leaky") -> dict[int, dict]:
    """`qemuleak scan --module-filter leaky` (exit code 1: leaks) -> leaks by address
    (key None: the scan's suppressed count)."""
    p = subprocess.run([sys.executable, "-m", "qemuleak.cli", "scan", vm.gdb_target,
                        "--system-map", str(guest_image.system_map), "--format", "json",
                        "--output", str(out), *(["--module-filter", module] if module else []),
                        *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "slub_debug=U" not in p.stderr, p.stderr          # tracks were found
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, report.JSON_SCHEMA)
    return {int(x["address"], 16): x for x in doc["scans"][0]["leaks"]} | \
        {None: doc["scans"][0]["suppressed"]}


@pytest.mark.series("6.1", "6.12")
def test_scan_command_with_slub_tracks(boot, guest_image, tmp_path):
    """`qemuleak scan` on a slub_debug=U guest that loaded leaky before qemuleak
    ever connected: leaky's slab leaks, with the backtraces SLUB recorded; none
    of its kept objects."""
    vm = boot(append="slub_debug=U")
    vm.send_line("insmod /modules/leaky.ko")
    vm.wait_for_line("leaky: ready", timeout=120)
    objs = parse_objects(vm.console_text())
    out = tmp_path / "scan.json"
    leaks = scan_command(vm, guest_image, out)
    # leaky's own cache held nothing before: no stale word can hide cache_leak
    leak = leaks[objs["cache_leak"].address]
    symbols = [f["symbol"].split("+")[0] for f in leak["backtrace"]]
    assert "make_leaks" in symbols and "do_init_module" in symbols, symbols   # the depot's stack
    assert leak["comm"] in ("insmod", "?") and leak["pid"] > 0, leak
    slab_leaks = {"kmalloc_leak", "cache_leak", "list_head", "list_node1", "list_node2",
                  "list_node3", "list_node4", "backtrace_leak", "krealloc_grown",
                  "krealloc_moved"}
    kept = {"bss_kept", "interior_kept", "stack_kept", "register_kept", "percpu_kept",
            "softirq_kept", "hardirq_kept"}
    # vmalloc areas too, with vm_struct's caller for their story, with or without --all
    for args in ((), ("--all",)):
        leaks = scan_command(vm, guest_image, out, *args)
        found = {n for n, o in objs.items() if o.address in leaks}
        assert "vmalloc_leak" in found and found <= slab_leaks | {"vmalloc_leak"}, sorted(found)
        assert not kept & found
    area = leaks[objs["vmalloc_leak"].address]
    assert area["size"] == 4 * 4096, area                     # whole pages, guard page left out
    assert area["backtrace"][0]["symbol"].startswith("make_leaks+"), area["backtrace"]
    assert area["backtrace"][0]["module"] == "leaky"
    # no filter: leaky's leaks only; the sysctl headers the kernel marks
    # kmemleak_not_leak() at boot are counted as suppressed
    leaks = scan_command(vm, guest_image, out, module=None)
    suppressed = leaks.pop(None)
    others = [(hex(a), [f["symbol"] for f in x["backtrace"]]) for a, x in leaks.items()
              if not any(f["module"] == "leaky" for f in x["backtrace"])]
    assert not others and suppressed >= 1, (others, suppressed)
    # the guest runs on
    vm.send_line("echo alive-$((40+2))")
    vm.wait_for_line("alive-42", timeout=30)
