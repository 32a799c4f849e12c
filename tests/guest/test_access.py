"""Guest access on real guests: every memory backend reads the same bytes, virtual
reads through our page-table walk agree with QEMU's own, registers of every vCPU."""

import pytest

from qemuleak.errors import GuestMemoryError
from qemuleak.guest import Guest
from qemuleak.memory import GdbstubMem, SharedRam
from tests.groundtruth import parse_objects
from tests.guest.helpers import qemu_virtual_read

pytestmark = pytest.mark.guest


def test_backends_agree_on_virtual_reads(leaky_vm, arch):
    objs = parse_objects(leaky_vm.console_text())
    with Guest.connect(leaky_vm.gdb_target) as g:
        assert g.mem.name == "proc-mem"       # local QEMU, no RAM file given
        backends = [SharedRam(leaky_vm.ram_fd_path(), g.ranges), g.mem, GdbstubMem(g.rsp, g.ranges)]
        pc = g.registers(0)[g.arch.pc_reg]
        places = {
            "direct map (kmalloc)": (objs["kmalloc_leak"].address, 96),
            "direct map (list)": (objs["list_head"].address, 64),
            "vmalloc": (objs["vmalloc_leak"].address, objs["vmalloc_leak"].size),
            "kernel image": (pc & ~0xFFF, 8192),
        }
        for what, (va, size) in places.items():
            reads = []
            for mem in backends:
                g.mem = mem
                reads.append(g.read(va, size))
            assert reads[0] == reads[1] == reads[2], what
            assert reads[0] == qemu_virtual_read(g, va, size), what
        # leaky filled its objects with their names: we read the real thing.
        g.mem = backends[0]
        assert g.read(objs["kmalloc_leak"].address, 24) == b"kmalloc_leak" * 2
        assert g.read(objs["vmalloc_leak"].address + 3 * 4096, 24) == b"vmalloc_leak" * 2
        # The page after a vmalloc area is its guard page.
        with pytest.raises(GuestMemoryError) as e:
            g.read(objs["vmalloc_leak"].address + 4 * 4096, 8)
        assert "not mapped" in str(e.value)
        g.mem = backends[1]
        backends[0].close()


def test_registers_of_every_vcpu(leaky_vm, arch):
    with Guest.connect(leaky_vm.gdb_target) as g:
        assert g.was_running
        assert len(g.cpus()) == 2
        for cpu in range(2):
            regs = g.registers(cpu)
            pc = regs[g.arch.pc_reg]
            assert pc >> 48 == 0xFFFF or not g.arch.in_kernel(regs)
        assert g.registers(0) != g.registers(1)
    # The guest runs on: it answers on its console.
    leaky_vm.send_line("echo still-$((40+2))")
    leaky_vm.wait_for_line("still-42", timeout=30)


def test_ram_above_the_4g_hole(boot, arch):
    """x86_64 with 4 GiB: RAM is split around the PCI hole, and all backends map
    both parts (arm64 virt has one range from 0x40000000)."""
    vm = boot(modules=(), memory_mib=4096)
    with Guest.connect(vm.gdb_target) as g:
        if arch == "x86_64":
            assert [(r.gpa, r.offset) for r in g.ranges] == [(0, 0), (1 << 32, 0xC0000000)]
        else:
            assert [(r.gpa, r.offset) for r in g.ranges] == [(0x40000000, 0)]
        assert g.ram_size() == 4 << 30
        shared = SharedRam(vm.ram_fd_path(), g.ranges)
        stub = GdbstubMem(g.rsp, g.ranges)
        try:
            last = g.ranges[-1]
            for gpa in (last.gpa, last.gpa + (123 << 20), last.end - 4096):
                assert shared.read(gpa, 4096) == g.mem.read(gpa, 4096) == stub.read(gpa, 4096)
            # The kernel uses that memory: some of it is not zero.
            assert any(shared.read(last.gpa + i * (64 << 20), 1 << 20).strip(b"\0")
                       for i in range(last.size >> 26))
        finally:
            shared.close()
