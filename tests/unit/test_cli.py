"""The command line as a user meets it: bad input gives one clear line and exit
code 2, never a traceback."""

import io
import socket
import subprocess
import sys
import threading

import pytest

CLI = [sys.executable, "-m", "qemuleak.cli"]


def qemuleak(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=60)


def one_line_error(p, text):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert text in p.stderr.splitlines()[0], p.stderr


@pytest.fixture
def ssh_server():
    """A TCP port where something that is not a gdbstub answers."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def test_attach_nothing_listening(tmp_path):
    one_line_error(qemuleak("attach", f"unix:{tmp_path}/none.sock"), "nothing listening")


def test_attach_not_a_gdbstub(ssh_server):
    one_line_error(qemuleak("attach", ssh_server), "is not a gdbstub")


def test_run_missing_files(tmp_path):
    one_line_error(qemuleak("run", "-c", "true", "--kernel", tmp_path / "k", "--initrd",
                            tmp_path / "i"), "kernel image not found")
    one_line_error(qemuleak("run", "--script", tmp_path / "missing.sh"), "cannot read the script")


def test_ctl_without_attach(tmp_path):
    one_line_error(qemuleak("ctl", tmp_path / "ctl.sock", "scan"), "")
    one_line_error(qemuleak("ctl", tmp_path / "ctl.sock", "bogus"), "")


def test_suppressions_file_errors_name_the_line(tmp_path):
    supp = tmp_path / "supp"
    supp.write_text("leak:ok\nnonsense\n")
    one_line_error(qemuleak("attach", f"unix:{tmp_path}/none.sock", "--suppressions", supp),
                   f"{supp}:2")


@pytest.mark.parametrize("command", ["attach", "run", "ctl", "trace", "info", "resume"])
def test_help(command):
    p = qemuleak(command, "--help")
    assert p.returncode == 0 and "usage: qemuleak " + command in p.stdout


def test_run_drive_missing_file(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")
    one_line_error(qemuleak("run", "-c", "true", "--kernel", kernel, "--drive",
                            tmp_path / "rootfs.ext2"),
                   f"disk image (--drive) not found: {tmp_path / 'rootfs.ext2'}")


@pytest.fixture
def booted(monkeypatch, tmp_path):
    """`qemuleak run ARGS` in-process up to QEMU's start: the VM it would start
    (config, QEMU command line, and the files' disk image's contents)."""
    import tarfile
    from qemuleak import cli, run_cmd
    from qemuleak.errors import LaunchError
    from qemuleak.launch import VM

    seen = {}

    class FakeVM(VM):
        def start(self, timeout=20.0):
            seen["config"], seen["argv"] = self.config, self.command_line()
            seen["disks"] = [d.read_bytes() for d in self.config.ro_drives]
            seen["initrd"] = self.config.initrd.read_bytes() if self.config.initrd else None
            raise LaunchError("stopped by the test")

    monkeypatch.setattr(run_cmd, "VM", FakeVM)
    monkeypatch.setattr(run_cmd, "check_modules", lambda *args: None)    # a fake .ko
    kernel, module = tmp_path / "bzImage", tmp_path / "mymod.ko"
    kernel.write_bytes(b"kernel")
    module.write_bytes(b"\x7fELF module")

    def _run(*args):
        seen.clear()
        assert cli.main(["run", "--kernel", str(kernel), "--module", str(module),
                         *map(str, args)]) == 2
        seen["tar"] = [tarfile.open(fileobj=io.BytesIO(d)) for d in seen["disks"]]
        return seen
    return _run


def test_run_drive_puts_the_files_on_a_second_disk(booted, tmp_path):
    from qemuleak.run_cmd import SCAN_SCRIPT
    rootfs = tmp_path / "rootfs.ext2"
    rootfs.write_bytes(b"\0" * 4096)
    seen = booted("--drive", rootfs, "-c", "insmod /modules/mymod.ko; qemuleak-scan x")
    config, argv = seen["config"], seen["argv"]
    assert config.drive == rootfs and config.initrd is None and "-initrd" not in argv
    cmdline = argv[argv.index("-append") + 1]
    assert " root=/dev/vda rw" in cmdline and "slub_debug=U,kmalloc-*" in cmdline
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={rootfs},format=raw,if=virtio,snapshot=on",
                      f"file={config.ro_drives[0]},format=raw,if=virtio,readonly=on"]
    assert len(seen["disks"][0]) % 512 == 0
    tar = seen["tar"][0]
    members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"bin/qemuleak-scan", "qemuleak/run.sh", "modules/mymod.ko"}
    assert all(m.isfile() for m in members.values())      # no directory entries
    assert members["bin/qemuleak-scan"].mode == 0o755
    assert tar.extractfile("bin/qemuleak-scan").read() == SCAN_SCRIPT.encode()
    assert tar.extractfile("qemuleak/run.sh").read() == b"insmod /modules/mymod.ko; qemuleak-scan x"
    assert tar.extractfile("modules/mymod.ko").read() == b"\x7fELF module"
    assert rootfs.read_bytes() == b"\0" * 4096


def test_run_drive_with_initrd_and_root(booted, tmp_path):
    rootfs, loader = tmp_path / "rootfs.ext2", tmp_path / "loader.cpio.gz"
    rootfs.write_bytes(b"\0" * 4096)
    loader.write_bytes(b"loader")
    seen = booted("--drive", rootfs, "--initrd", loader, "--append", "root=/dev/vda1",
                  "-c", "true")
    # the user's initrd as it is: it may switch_root away from anything appended
    assert seen["config"].initrd == loader and seen["initrd"] == b"loader"
    cmdline = seen["argv"][seen["argv"].index("-append") + 1]
    assert "root=/dev/vda1" in cmdline and "root=/dev/vda " not in cmdline + " "
    assert len(seen["tar"]) == 1


def test_run_initrd_gets_the_files_appended(booted, tmp_path):
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(b"base")
    seen = booted("--initrd", initrd, "-c", "true")
    config = seen["config"]
    assert config.drive is None and config.ro_drives == () and "-drive" not in seen["argv"]
    assert config.initrd != initrd and seen["initrd"].startswith(b"base")
    assert "root=" not in seen["argv"][seen["argv"].index("-append") + 1]


@pytest.mark.parametrize("argv", [["attach", ":1234"], ["scan", ":1234"],
                                  ["trace", ":1234", "--scan"], ["run", "-c", "true"]])
def test_all_reaches_the_scan_options(argv):
    from qemuleak.cli import build_parser, report_options
    parser = build_parser()
    assert report_options(parser.parse_args(argv)).all_objects is False
    assert report_options(parser.parse_args([*argv, "--all"])).all_objects is True


@pytest.mark.parametrize("arch, console, first_probe_after", [
    ("arm64", "[    2.3] Run /init as init process\n", 0.0),   # PL011: after init runs
    ("arm64", "[    2.3] quiet kernel\n", 0.5),                  # ... or after the grace
    ("x86_64", "[    2.3] quiet kernel\n", 0.0),                 # 8250: at once
])
def test_run_types_on_a_pl011_console_only_once_init_runs(tmp_path, monkeypatch, arch, console,
                                                          first_probe_after):
    import time
    from qemuleak import run_cmd
    from qemuleak.launch import VM, VMConfig
    monkeypatch.setattr(run_cmd, "INIT_GRACE", 0.5)
    sent = []

    class Proc:
        stdin = io.BytesIO()

        def poll(self):
            return None

    class ConsoleVM(VM):
        def send_line(self, text):
            sent.append(time.monotonic())
            with open(self.console_path, "a") as f:        # the shell answers at once
                f.write(f"{text}\nqemuleak-shell-{len(sent)}42\n")

    vm = ConsoleVM(VMConfig(kernel=tmp_path / "k", arch=arch))
    vm.workdir, vm.proc = tmp_path, Proc()
    vm.console_path.write_text(console)
    start = time.monotonic()
    run_cmd._wait_for_shell(vm, deadline=start + 10)
    assert len(sent) == 1
    assert first_probe_after <= sent[0] - start < first_probe_after + 0.4


@pytest.mark.parametrize("append, provenance, expect", [
    ("", "auto", "slub_debug=U,kmalloc-*"),
    ("quiet", "tracks", "quiet slub_debug=U,kmalloc-*"),
    ("slub_debug=U", "auto", "slub_debug=U"),              # the user's setting wins
    ("a slub_debug b", "auto", "a slub_debug b"),
    ("quiet", "breakpoints", "quiet"),
    ("xslub_debug=1", "auto", "xslub_debug=1 slub_debug=U,kmalloc-*"),
])
def test_run_boots_with_allocation_tracks_unless_told(append, provenance, expect):
    from qemuleak.run_cmd import boot_append
    assert boot_append(append, provenance) == expect
