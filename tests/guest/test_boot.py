"""The foundation on real guests: both arches boot, leaky loads and announces its
objects, the launcher's gdbstub, shared RAM and shutdown behave."""

import mmap
import re
import socket

import pytest

from qemuleak.errors import LaunchError
from qemuleak.launch import VM, VMConfig
from tests.conftest import process_gone
from tests.groundtruth import LEAKY_PERCPU, LEAKY_SIZES, SPINNER_RE, parse_objects, parse_refs

pytestmark = pytest.mark.guest


def load_leaky(vm: VM) -> str:
    vm.send_line("insmod /modules/leaky.ko")
    vm.wait_for_line("leaky: ready", timeout=60)
    return vm.console_text()


def test_leaky_announces_every_object(boot, arch):
    vm = boot()
    console = load_leaky(vm)
    objs = parse_objects(console)
    assert {n: o.size for n, o in objs.items()} == LEAKY_SIZES
    addrs = [o.address for o in objs.values()]
    assert len(set(addrs)) == len(addrs)
    assert all(o.address >> 48 == 0xffff for o in objs.values() if o.name not in LEAKY_PERCPU)
    # The list was built tail first: five distinct 64-byte nodes.
    assert len({objs[f"list_node{i}"].address for i in range(1, 5)}) == 4
    assert parse_refs(console)["interior_kept"] == objs["interior_kept"].address + 100
    spinner = SPINNER_RE.search(console)
    assert spinner and int(spinner.group(1)) == 1          # bound to the last of 2 CPUs
    assert spinner.group(2) == {"x86_64": "r12", "arm64": "x19"}[arch]
    # The backtrace test's dump_stack comes right before its allocation.
    dump_at = console.index("leaky: dump_stack before backtrace_leak")
    assert "backtrace_alloc+" in console[dump_at:console.index("obj backtrace_leak")]

    # Module exit frees everything it can and leaks exit_leak.
    vm.send_line("rmmod leaky")
    vm.wait_for_line("leaky: exit", timeout=60)
    exit_objs = parse_objects(vm.console_text())
    assert exit_objs["exit_leak"].size == 64
    assert "Objects remaining" not in vm.console_text()
    assert "BUG" not in vm.console_text()


def test_guest_ram_is_shared_with_the_host(boot):
    vm = boot()
    objs = parse_objects(load_leaky(vm))
    with open(vm.ram_fd_path(), "rb") as f:
        ram = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert len(ram) == 512 << 20
            # leaky fills each object with its name: the host sees it in guest RAM.
            at = ram.find(b"kmalloc_leak" * 4)
            assert at >= 0
            # Its offset in RAM shares the page offset with the virtual address.
            assert at % 4096 == objs["kmalloc_leak"].address % 4096 or \
                ram.find(b"kmalloc_leak" * 4, at + 1) >= 0
        finally:
            ram.close()


def gdb_stop_reply(sock: socket.socket) -> bytes:
    """Ask a gdbstub for its stop reason with a raw `?` packet."""
    sock.settimeout(10)
    sock.sendall(b"$?#3f")
    data = b""
    while not re.search(rb"\$[^#]*#..", data.lstrip(b"+")):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.sendall(b"+")
    return data


def test_gdbstub_unix_socket(boot):
    vm = boot(modules=())
    assert vm.gdb_target.startswith("unix:")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(vm.gdb_target[len("unix:"):])
        assert re.search(rb"\$[ST][0-9a-f]{2}", gdb_stop_reply(s))
        s.sendall(b"$c#63")      # let the guest run on before shutdown


def test_gdbstub_tcp_listens_on_loopback_only(boot):
    vm = boot(modules=(), gdb="tcp")
    host, port = vm.gdb_target.rsplit(":", 1)
    assert host == "127.0.0.1"
    listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    ours = [f for f in listening if f[1].endswith(":%04X" % int(port)) and f[3] == "0A"]
    assert ours and all(f[1].startswith("0100007F:") for f in ours), ours
    with socket.create_connection((host, int(port))) as s:
        assert re.search(rb"\$[ST][0-9a-f]{2}", gdb_stop_reply(s))
        s.sendall(b"$c#63")


def test_wait_for_line_timeout_shows_console_tail(boot):
    vm = boot(modules=())
    vm.send_line("echo marker-$((6*7))")
    vm.wait_for_line("marker-42", timeout=30)
    with pytest.raises(LaunchError) as e:
        vm.wait_for_line("this line never comes", timeout=1)
    assert "within 1 s" in str(e.value) and "marker-42" in str(e.value)


def test_panic_ends_the_guest_with_its_console(boot):
    vm = boot(modules=())
    vm.send_line("echo c > /proc/sysrq-trigger")
    with pytest.raises(LaunchError) as e:
        vm.wait_for_line("never printed", timeout=60)
    first_line = str(e.value).splitlines()[0]
    assert "QEMU exited" in first_line
    assert "the guest kernel panicked: sysrq triggered crash" in first_line


def test_no_process_left_after_shutdown(guest_image, tmp_path):
    vm = VM(VMConfig(kernel=guest_image.kernel, arch=guest_image.arch,
                     initrd=guest_image.base_initramfs))
    with vm:
        pid, workdir = vm.pid, vm.workdir
        assert vm.alive()
    assert not vm.alive()
    assert process_gone(pid, workdir)
    assert not workdir.exists()


def test_no_process_left_when_the_test_body_fails(guest_image):
    vm = VM(VMConfig(kernel=guest_image.kernel, arch=guest_image.arch,
                     initrd=guest_image.base_initramfs))
    with pytest.raises(ZeroDivisionError):
        with vm:
            pid, workdir = vm.pid, vm.workdir
            1 / 0
    assert process_gone(pid, workdir)


def test_bad_kernel_path_is_one_clear_error(guest_image, tmp_path):
    vm = VM(VMConfig(kernel=tmp_path / "no-such-bzImage", arch=guest_image.arch))
    with pytest.raises(LaunchError) as e:
        vm.start()
    assert str(e.value).startswith("kernel image not found: ")
    assert "\n" not in str(e.value)
    assert vm.proc is None


def test_not_a_kernel_is_one_clear_error(guest_image, tmp_path):
    bogus = tmp_path / "bzImage"
    bogus.write_bytes(b"this is not a kernel\n" * 100)
    vm = VM(VMConfig(kernel=bogus, arch=guest_image.arch, initrd=guest_image.base_initramfs))
    with pytest.raises(LaunchError) as e:
        with vm:
            vm.wait_for_line("Linux version", timeout=15)
    assert vm.proc is None or process_gone(vm.pid, None)
    assert "QEMU exited" in str(e.value) or "did not print" in str(e.value)
