"""The kernel layer on real guests: drgn over our memory transport, module symbols
from guest memory, and x86_64 5-level paging."""

import re

import pytest

from qemuleak.guest import Guest
from qemuleak.kernel import modules
from qemuleak.kernel.kernel import Kernel
from tests.groundtruth import parse_objects
from tests.guest.helpers import qemu_virtual_read

pytestmark = pytest.mark.guest


def test_drgn_unwinds_the_sleeper_over_our_transport(leaky_vm, guest_image):
    with Guest.connect(leaky_vm.gdb_target, ram_path=leaky_vm.ram_fd_path()) as g:
        kernel = Kernel.open(g, vmlinux=guest_image.vmlinux)
        prog = kernel.drgn_program([guest_image.module("leaky")])
        from drgn.helpers.linux.pid import for_each_task
        [sleeper] = [t for t in for_each_task(prog) if t.comm.string_() == b"leaky_sleeper"]
        frames = [(f.name, f.source()[0] if f.name else None) for f in prog.stack_trace(sleeper)]
        names = [n for n, _ in frames]
        assert names.index("schedule") < names.index("schedule_timeout") < \
            names.index("sleeper_fn") < names.index("kthread")
        assert dict(frames)["sleeper_fn"].endswith("leaky/leaky.c")
        # The same task, found by our own walk of the task list.
        ours = {t.comm: t for t in kernel_tasks(kernel)}
        assert ours["leaky_sleeper"].address == sleeper.value_()


def kernel_tasks(kernel):
    from qemuleak.kernel.tasks import for_each_task
    return list(for_each_task(kernel))


@pytest.mark.parametrize("source", ["system_map", "none"])
def test_module_symbols_name_frames(leaky_vm, guest_image, source):
    kwargs = {"system_map": guest_image.system_map} if source == "system_map" else {}
    with Guest.connect(leaky_vm.gdb_target) as g:
        kernel = Kernel.open(g, **kwargs)
        [leaky] = modules.for_each_module(kernel)
        table = modules.module_symbols(kernel, leaky)
        init = table.address_of("backtrace_alloc")
        assert table.format(init + 0x10).startswith("backtrace_alloc+0x10/0x")
        assert table.format(init + 0x10).endswith(" [leaky]")
    # The kernel printed the same function's size in dump_stack().
    m = re.search(r"backtrace_alloc\+0x[0-9a-f]+/(0x[0-9a-f]+) \[leaky\]", leaky_vm.console_text())
    assert table.lookup(init).size == int(m.group(1), 16)


def test_five_level_paging(boot, arch):
    if arch != "x86_64":
        pytest.skip("5-level paging is x86_64's")
    vm = boot(cpu="max,la57=on")
    vm.send_line("insmod /modules/leaky.ko")
    vm.wait_for_line("leaky: ready", timeout=60)
    objs = parse_objects(vm.console_text())
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as g:
        assert g.page_tables().fmt.shifts[0] == 48           # five levels
        assert objs["kmalloc_leak"].address >> 56 == 0xFF     # a 57-bit address
        assert g.read(objs["kmalloc_leak"].address, 24) == b"kmalloc_leak" * 2
        assert g.read(objs["vmalloc_leak"].address, 24) == b"vmalloc_leak" * 2
        assert qemu_virtual_read(g, objs["list_head"].address, 64) == g.read(objs["list_head"].address, 64)
