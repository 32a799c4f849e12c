"""`qemuleak info` on real guests, checked against what the guest says of itself
(/proc/kallsyms, /proc/modules, ps), with vmlinux, System.map, and neither."""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from qemuleak import initramfs
from qemuleak.info import describe
from qemuleak.kernel.symbols import SymbolTable
from qemuleak.launch import VM, VMConfig
from tests.conftest import guest_image_for

pytestmark = pytest.mark.guest


def guest_says(vm: VM, command: str, marker: str) -> str:
    """Run `command` in the guest shell; its output, up to an end marker."""
    vm.send_line(f"{command}; echo {marker}-$((1+1))")
    end = vm.wait_for_line(f"{marker}-2", timeout=30)
    text = vm.console_text()[:end.start()]
    return text[text.rfind(command):]


@pytest.fixture(scope="module", params=[(a, s) for s in ("6.1", "6.12") for a in ("x86_64", "arm64")],
                ids=lambda p: f"{p[0]}-k{p[1]}")
def booted(request, tmp_path_factory):
    """One guest per arch and kernel series with leaky loaded; facts the guest
    states about itself."""
    image = guest_image_for(*request.param)
    initrd = initramfs.compose(image.base_initramfs, tmp_path_factory.mktemp("i") / "initrd.gz",
                               initramfs.module_files([image.module("leaky")]))
    with VM(VMConfig(kernel=image.kernel, arch=image.arch, initrd=initrd, smp=2)) as vm:
        vm.wait_for_line(initramfs.READY_MARKER, timeout=90)
        vm.send_line("insmod /modules/leaky.ko")
        vm.wait_for_line("leaky: ready", timeout=60)
        # arm64 has no KALLSYMS_ALL: take a function, which kallsyms always lists.
        kallsyms = guest_says(vm, "grep -w do_one_initcall /proc/kallsyms", "ks")
        initcall_at = int(re.search(r"([0-9a-f]{16}) T do_one_initcall", kallsyms).group(1), 16)
        mods = guest_says(vm, "cat /proc/modules", "mods")
        m = re.search(r"^leaky (\d+) .* (0x[0-9a-f]+)", mods, re.M)
        ps = guest_says(vm, "ps -o pid,comm", "ps")
        spinner_pid = int(re.search(r"^\s*(\d+) leaky_spinner", ps, re.M).group(1))
        release = guest_says(vm, "uname -r", "rel").split()[-1]
        proc_version = guest_says(vm, "cat /proc/version", "ver").splitlines()[1].strip()
        slide = initcall_at - SymbolTable.from_system_map(image.system_map).address_of("do_one_initcall")
        yield {"vm": vm, "image": image, "slide": slide, "release": release,
               "leaky_base": int(m.group(2), 16), "leaky_size": int(m.group(1)),
               "spinner_pid": spinner_pid, "proc_version": proc_version}


@pytest.mark.parametrize("source", ["vmlinux", "system_map", "none"])
def test_info_matches_the_guest(booted, source):
    image, vm = booted["image"], booted["vm"]
    kwargs = {"vmlinux": image.vmlinux} if source == "vmlinux" else \
        {"system_map": image.system_map} if source == "system_map" else {}
    d = describe(vm.gdb_target, **kwargs)
    assert d["arch"] == image.arch
    assert d["release"] == booted["release"] == image.release
    assert d["banner"] == booted["proc_version"]
    assert d["banner"].startswith(f"Linux version {image.release} ")
    assert int(d["kaslr_offset"], 16) == booted["slide"]
    assert booted["slide"] != 0                         # KASLR is on in this guest
    assert d["memory_backend"] == "proc-mem"
    assert d["ram_bytes"] == 512 << 20
    assert [v["cpu"] for v in d["vcpus"]] == [0, 1]
    # The spinner owns CPU 1; CPU 0 idles (or runs something short-lived).
    assert d["vcpus"][1]["comm"] == "leaky_spinner"
    assert d["vcpus"][1]["pid"] == booted["spinner_pid"]
    assert d["vcpus"][1]["mode"] == "kernel"
    [leaky] = d["modules"]
    assert leaky["name"] == "leaky"
    assert int(leaky["regions"][0][0], 16) == booted["leaky_base"]
    assert d["was_running"]
    # Still running: it answers on its console.
    assert "ok-2" in guest_says(vm, "echo ok-$((1+1))", "alive")


def test_gdbstub_backend_finds_the_same(booted):
    image, vm = booted["image"], booted["vm"]
    d = describe(vm.gdb_target, system_map=image.system_map, backend="gdbstub")
    assert d["memory_backend"] == "gdbstub"
    assert int(d["kaslr_offset"], 16) == booted["slide"]
    assert d["kaslr_method"] != "vmcoreinfo"       # no RAM search on the slow path
    assert [m["name"] for m in d["modules"]] == ["leaky"]


def qemuleak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemuleak.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_text_and_json(booted):
    vm, image = booted["vm"], booted["image"]
    r = qemuleak("info", vm.gdb_target, "--system-map", str(image.system_map), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert int(d["kaslr_offset"], 16) == booted["slide"]
    r = qemuleak("info", vm.gdb_target)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^kaslr_offset\s+{booted['slide']:#x} ", r.stdout, re.M)
    assert re.search(r"^\s+leaky\s+0x", r.stdout, re.M)


def test_vmlinux_of_another_kernel(booted, tmp_path):
    """A vmlinux whose banner differs (as a rebuilt kernel's would): one clear error."""
    image, vm = booted["image"], booted["vm"]
    other = tmp_path / "vmlinux"
    shutil.copyfile(image.vmlinux, other)
    data = other.read_bytes()
    old = f"Linux version {image.release} ".encode()
    assert old in data
    new = f"Linux version {image.release[::-1]} ".encode()      # same length: offsets stay
    other.write_bytes(data.replace(old, new))
    r = qemuleak("info", vm.gdb_target, "--vmlinux", str(other))
    assert r.returncode == 2
    assert r.stderr.startswith("qemuleak: error: the vmlinux is from another kernel")
    assert "Traceback" not in r.stderr
    assert "ok-2" in guest_says(vm, "echo ok-$((1+1))", "after-error")


def test_system_map_of_another_arch(booted):
    vm, image = booted["vm"], booted["image"]
    other = guest_image_for("arm64" if image.arch == "x86_64" else "x86_64")
    r = qemuleak("info", vm.gdb_target, "--system-map", str(other.system_map))
    assert r.returncode == 2
    assert r.stderr.startswith("qemuleak: error: the symbols do not match the guest kernel")
    assert len(r.stderr.strip().splitlines()) == 2      # the error and its hint


def test_truncated_system_map(booted, tmp_path):
    vm, image = booted["vm"], booted["image"]
    cut = tmp_path / "System.map"
    data = image.system_map.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    r = qemuleak("info", vm.gdb_target, "--system-map", str(cut))
    assert r.returncode == 2
    assert "truncated" in r.stderr.splitlines()[0] or "malformed" in r.stderr.splitlines()[0]


def test_nothing_listening(tmp_path):
    r = qemuleak("info", f"unix:{tmp_path}/nope.sock")
    assert r.returncode == 2
    assert r.stderr.startswith("qemuleak: error: nothing listening at unix:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = qemuleak("info", f":{port}")
    assert r.returncode == 2 and "nothing listening" in r.stderr


def test_not_a_gdbstub():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.recv(100)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    r = qemuleak("info", f"127.0.0.1:{server.getsockname()[1]}")
    server.close()
    assert r.returncode == 2
    assert "is not a gdbstub" in r.stderr.splitlines()[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_nokaslr_guest(arch):
    image = guest_image_for(arch)
    with VM(VMConfig(kernel=image.kernel, arch=arch, initrd=image.base_initramfs, kaslr=False)) as vm:
        vm.wait_for_line(initramfs.READY_MARKER, timeout=90)
        for kwargs in ({"vmlinux": image.vmlinux}, {"system_map": image.system_map}, {}):
            d = describe(vm.gdb_target, **kwargs)
            assert d["kaslr_offset"] == "0x0", kwargs
            assert d["banner"].startswith(f"Linux version {image.release} ")
