"""The user-facing workflows end to end, as a user runs them: `qemuleak run`
booting real guests (exit codes 0/1/2, every report format, filters), and
`qemuleak attach` + `qemuleak ctl` on a QEMU started on its own."""

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from tests import sarif
from tests.conftest import guest_image_for, missing
from tests.groundtruth import LEAKY_LEAKS, parse_objects
from qemuleak import report

CLI = [sys.executable, "-m", "qemuleak.cli"]
ROOT = Path(__file__).resolve().parents[2]


def qemuleak(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def leaky_run(arch, tmp_path, fmt, *extra):
    """`qemuleak run` loading leaky, a scan labelled 'loaded', then rmmod."""
    image = guest_image_for(arch)
    out = tmp_path / f"report.{fmt}"
    console = tmp_path / "console.log"
    p = qemuleak("run", "--arch", arch, "--module", image.module("leaky"),
                 "-c", "insmod /modules/leaky.ko; qemuleak-scan loaded; rmmod leaky",
                 "--format", fmt, "--output", out, "--console", console,
                 "--untracked", "ignore", "--module-filter", "leaky", *extra)
    assert "Traceback" not in p.stderr, p.stderr
    return p, out, parse_objects(console.read_text())


def test_run_leaky_sarif_with_suppressions(tmp_path):
    supp = tmp_path / "supp"
    supp.write_text("leak:backtrace_a*\n")
    image = guest_image_for("x86_64")
    build = image.kernel.parent / "build"        # where leaky.ko was built: its DWARF's paths
    p, out, objs = leaky_run("x86_64", tmp_path, "sarif", "--suppressions", supp,
                             "--vmlinux", image.vmlinux, "--source-root", build)
    assert p.returncode == 1, p.stderr
    assert "scan loaded:" in p.stderr and "scan final:" in p.stderr, p.stderr
    doc = json.loads(out.read_text())
    sarif.validator().validate(doc)
    results = doc["runs"][0]["results"]
    addresses = {a for r in results for a in r["properties"]["addresses"]}
    # leaky's own cache held nothing before: no stale word can hide cache_leak
    assert f"{objs['cache_leak'].address:#x}" in addresses, results
    assert f"{objs['backtrace_leak'].address:#x}" not in addresses      # suppressed
    assert f"{objs['bss_kept'].address:#x}" not in addresses
    # module filter: every result's backtrace passes through leaky
    assert all(any(f["module"] == "leaky" for f in r["stacks"][0]["frames"]) for r in results)
    # located at leaky's source line (DWARF of the vmlinux and of leaky.ko)
    source = (ROOT / "images/modules/leaky/leaky.c").read_text().splitlines()
    line = next(i + 1 for i, text in enumerate(source) if "kmem_cache_alloc(" in text)
    cache = next(r for r in results if f"{objs['cache_leak'].address:#x}" in r["properties"]["addresses"])
    where = cache["locations"][0]["physicalLocation"]
    # relative to --source-root, as GitHub code scanning needs
    assert where["artifactLocation"] == {"uri": "leaky/leaky.c", "uriBaseId": "%SRCROOT%"}, where
    assert where["region"]["startLine"] == line, where
    assert doc["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == build.as_uri() + "/"
    # exit_leak is made by module exit (rmmod): reported by the final scan, unless a
    # stale word hides it (kmemleak's blind spot; seen in two full-suite runs,
    # never alone). The CLI cannot say why; test_scan.py's test_exit_leak_after_rmmod
    # checks the same leak in process, where only a stale word may hide it.
    if f"{objs['exit_leak'].address:#x}" not in addresses:
        print("exit_leak not reported by the final scan (a stale word?)")


# run boots with allocation tracks and takes them (auto), unless told otherwise
@pytest.mark.series("6.1", "6.12")
@pytest.mark.parametrize("provenance, says", [
    ("auto", "tracing with SLUB's allocation tracks"), ("breakpoints", "tracing with breakpoints")])
def test_run_leaky_junit(tmp_path, arch, series, provenance, says):
    p, out, objs = leaky_run(arch, tmp_path, "junit", "--provenance", provenance)
    assert p.returncode == 1, p.stderr
    assert says in p.stderr, p.stderr
    suite = ET.parse(out).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"loaded", "final"}
    failure = cases["loaded"].find("failure")
    assert failure is not None
    assert f"unreferenced object {objs['cache_leak'].address:#010x}" in failure.text


def test_run_json_clean_guest_exits_0(tmp_path, arch):
    guest_image_for(arch)
    out = tmp_path / "r.json"
    p = qemuleak("run", "--arch", arch, "-c", "ls /proc > /dev/null; qemuleak-scan idle",
                 "--format", "json", "--output", out)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, report.JSON_SCHEMA)
    assert [s["label"] for s in doc["scans"]] == ["idle", "final"]
    assert all(s["leaks"] == [] and s["objects_tracked"] > 0 for s in doc["scans"])


@pytest.mark.parametrize("commands, timeout, expect", [
    ("true; false; echo not-reached", 300, "a guest command failed: `false` exited with status 1"),
    ("echo c > /proc/sysrq-trigger", 300, "panic"),
    ("sleep 600", 60, "did not finish in time"),
])
def test_run_errors_exit_2(tmp_path, arch, commands, timeout, expect):
    guest_image_for(arch)
    p = qemuleak("run", "--arch", arch, "-c", commands, "--timeout", timeout)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "console tail" in p.stderr
    if "command failed" in expect:          # the tail: the guest's lines, none of ours
        tail = p.stderr.split("console tail:", 1)[1]
        assert "qemuleak-" not in tail and "\x1b" not in tail and "not-reached" not in tail, tail


def test_run_drive_rootfs_ext2(tmp_path, arch):
    """buildroot style: the root file system on a virtio disk. The Debian kernel has
    virtio_blk as a module, so the image's loader initrd loads it and switch_roots
    to /dev/vda; qemuleak's files come on a second disk. The rootfs stays unchanged."""
    image = guest_image_for(arch)
    if image.rootfs is None or image.loader_initrd is None:
        missing(f"the {arch} image has no rootfs.ext2 and loader initrd: run `make images`")
    digest = hashlib.sha256(image.rootfs.read_bytes()).hexdigest()
    out, console = tmp_path / "report.json", tmp_path / "console.log"
    p = qemuleak("run", "--arch", arch, "--drive", image.rootfs, "--initrd",
                 image.loader_initrd, "--module", image.module("leaky"),
                 "-c", "cat /proc/mounts; insmod /modules/leaky.ko; qemuleak-scan mid",
                 "--format", "json", "--output", out, "--console", console,
                 "--module-filter", "leaky")
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, p.stderr
    log = console.read_text()
    assert re.search(r"^/dev/vda / ext2 rw", log, re.M), log[-4000:]    # the root is the disk
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, report.JSON_SCHEMA)
    assert [s["label"] for s in doc["scans"]] == ["mid", "final"]
    objs = parse_objects(log)
    found = {int(leak["address"], 16) for leak in doc["scans"][0]["leaks"]}
    # (leaky's own cache held nothing before: no stale word can hide cache_leak)
    assert objs["cache_leak"].address in found
    assert found <= {objs[name].address for name in LEAKY_LEAKS}, (found, objs)
    assert hashlib.sha256(image.rootfs.read_bytes()).hexdigest() == digest


def test_run_drive_without_the_disk_driver_exits_2(tmp_path):
    """The Debian kernel alone cannot mount a virtio root (virtio_blk is a module):
    the panic is the error, with a hint, and no initrd is passed behind the user's back."""
    image = guest_image_for("x86_64")
    if image.rootfs is None:
        missing("the x86_64 image has no rootfs.ext2: run `make images`")
    p = qemuleak("run", "--drive", image.rootfs, "-c", "true", "--timeout", 120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    error = next(line for line in p.stderr.splitlines() if line.startswith("qemuleak: error:"))
    assert "Unable to mount root fs" in error, p.stderr
    assert "hint: with --drive the kernel needs virtio_blk" in p.stderr, p.stderr


# a guest booted with allocation tracks is traced with them, one without with
# breakpoints (auto)
@pytest.mark.series("6.1", "6.12")
@pytest.mark.parametrize("append, says", [
    ("", "tracing with breakpoints"),
    ("slub_debug=U,kmalloc-*", "tracing with SLUB's allocation tracks")])
def test_attach_ctl_end_to_end(boot, guest_image, tmp_path, append, says):
    """QEMU started on its own with a TCP gdbstub, KASLR on; attach; leaky loaded
    after attaching; ctl scan, dump=, clear, stack=off; Ctrl-C; the guest runs on."""
    vm = boot(modules=("leaky",), gdb="tcp", append=append)
    out, sock = tmp_path / "report.json", tmp_path / "ctl.sock"
    p = subprocess.Popen([*CLI, "attach", vm.gdb_target, "--system-map",
                          str(guest_image.system_map), "--control", str(sock),
                          "--scan-interval", "0", "--format", "json", "--output", str(out),
                          "--untracked", "ignore", "--module-filter", "leaky"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    while "tracing" not in err and p.poll() is None:
        err += p.stderr.readline()
    assert p.poll() is None, err + p.stderr.read()
    assert says in err, err
    assert (sock.stat().st_mode & 0o777) == 0o600

    def ctl(*command):
        r = qemuleak("ctl", sock, *command, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    vm.send_line("insmod /modules/leaky.ko")
    deadline = time.monotonic() + 120
    while "leaky: ready" not in vm.console_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    objs = parse_objects(vm.console_text())
    cache_leak = objs["cache_leak"].address

    assert "scan loaded:" in ctl("scan", "loaded")
    scans = json.loads(out.read_text())["scans"]
    assert [s["label"] for s in scans] == ["loaded"]
    assert cache_leak in {int(x["address"], 16) for x in scans[0]["leaks"]}
    dump = ctl(f"dump={cache_leak:#x}")
    assert f"{cache_leak:#x}" in dump and "leak" in dump, dump
    # a kept object's dump says what keeps it: leaky's pointer into its middle, in
    # leaky's module memory (a root, or a tracked object: it was loaded while tracing)
    dump = ctl(f"dump={objs['interior_kept'].address:#x}")
    keeper = dump.split("referenced from:\n", 1)[-1]
    assert "referenced from:" in dump and ("module leaky" in keeper
                                           or keeper.strip().startswith("referenced object")), dump
    assert "cleared" in ctl("clear")
    # stack=off: stack_kept (only on a sleeping kthread's stack) leaks; a register
    # may still hold it for a while: rescan, as syzkaller does
    ctl("stack=off")
    stack_kept = objs["stack_kept"].address
    for i in range(3):
        ctl("scan", f"nostack{i}")
        scans = json.loads(out.read_text())["scans"]
        found = {int(x["address"], 16) for x in scans[-1]["leaks"]}
        assert cache_leak not in found               # reported once, then cleared
        if stack_kept in found:
            break
    assert stack_kept in found
    assert "error" in subprocess.run([*CLI, "ctl", str(sock), "bogus"], capture_output=True,
                                     text=True).stderr

    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=300)
    assert "Traceback" not in rest, rest
    assert p.returncode == 1, rest
    scans = json.loads(out.read_text())["scans"]
    jsonschema.validate(json.loads(out.read_text()), report.JSON_SCHEMA)
    assert scans[-1]["label"] == "final"
    # the guest runs on, allocating, with no breakpoint left
    vm.send_line("ls /proc > /dev/null; echo alive-$((20+22))")
    vm.wait_for_line("alive-42", timeout=30)


def test_symbols_of_another_kernel_exit_2(boot, guest_image, tmp_path):
    """run and attach given symbols that are not the guest's: one clear line, exit
    2; attach leaves the guest running."""
    other_arch = "arm64" if guest_image.arch == "x86_64" else "x86_64"
    other = guest_image_for(other_arch).system_map
    p = qemuleak("run", "--arch", guest_image.arch, "--system-map", other, "-c", "true",
                 timeout=300)
    assert p.returncode == 2, p.stderr
    assert "qemuleak: error: the symbols do not match the guest kernel" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    vm = boot(modules=(), gdb="tcp")
    vmlinux = tmp_path / "vmlinux"           # as a rebuilt kernel's: another banner
    data = guest_image.vmlinux.read_bytes()
    old = f"Linux version {guest_image.release} ".encode()
    assert old in data
    vmlinux.write_bytes(data.replace(old, f"Linux version {guest_image.release[::-1]} ".encode()))
    p = qemuleak("attach", vm.gdb_target, "--vmlinux", vmlinux, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("qemuleak: error: the vmlinux is from another kernel"), p.stderr
    assert "Traceback" not in p.stderr
    vm.send_line("echo still-$((40+2))")
    vm.wait_for_line("still-42", timeout=60)


def test_run_module_for_another_kernel_exits_2_before_booting(monkeypatch):
    """A module built for another arch or another kernel release: one line naming
    the module, what it is for and what the guest runs; exit 2, no boot."""
    monkeypatch.delenv("QEMULEAK_SERIES", raising=False)      # run's default kernel: 6.1
    x86, arm = guest_image_for("x86_64", "6.1"), guest_image_for("arm64", "6.1")
    start = time.monotonic()
    p = qemuleak("run", "--arch", "x86_64", "--module", arm.module("leaky"), "-c", "true",
                 timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"module leaky.ko is for arm64 ({arm.release}); the guest is x86_64 ({x86.release})" \
        in p.stderr, p.stderr
    assert "booting" not in p.stderr and "Traceback" not in p.stderr
    other = guest_image_for("x86_64", "6.12")
    p = qemuleak("run", "--arch", "x86_64", "--module", other.module("leaky"), "-c", "true",
                 timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"module leaky.ko is for kernel {other.release} (x86_64); the guest runs " \
           f"{x86.release} (x86_64)" in p.stderr, p.stderr
    assert time.monotonic() - start < 30          # nothing booted
