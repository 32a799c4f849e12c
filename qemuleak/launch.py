"""Start and stop QEMU guests: kernel + initrd or disk, gdbstub, shared RAM, console.

The guest's RAM comes from a memfd backend (share=on), so the host can map it
through /proc/<qemu pid>/fd without leaving a file behind if we die. The gdbstub
listens on a unix socket in a private directory, or on an ephemeral 127.0.0.1 port;
never on 0.0.0.0. The serial console is QEMU's stdio: we write commands to its
stdin and it writes the console log file, which `wait_for_line` reads.

QEMU runs in its own session (Ctrl-C in the terminal does not kill it; we shut it
down in order) and dies with us (PR_SET_PDEATHSIG), so no guest outlives its owner.
"""

import atexit
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .arch import get_arch
from .errors import LaunchError

_LIVE: set["VM"] = set()


@dataclass
class VMConfig:
    """What to boot and how."""

    kernel: Path
    arch: str = "x86_64"
    initrd: Path | None = None
    drive: Path | None = None      # raw root disk image (e.g. buildroot rootfs.ext2): the
                                   # first virtio disk, /dev/vda; root=/dev/vda unless
                                   # `append` has a root=, rw unless it has ro or rw;
                                   # snapshot=on: the guest's writes go to a temporary
                                   # overlay: the file is never changed, runs may share it
    ro_drives: tuple[Path, ...] = ()   # raw read-only virtio disks after `drive` (/dev/vdb...)
    append: str = ""               # extra kernel command line
    memory_mib: int = 512
    smp: int = 1
    accel: str = "tcg"             # "kvm" only when asked: TCG is what is known to work
    cpu: str | None = None         # QEMU -cpu model; None: the arch's default
    gdb: str = "unix"              # "unix" socket or "tcp" on an ephemeral 127.0.0.1 port
    kaslr: bool = True
    extra_args: tuple[str, ...] = field(default=())


class VM:
    """One running QEMU. Use as a context manager, or call start() and shutdown()."""

    def __init__(self, config: VMConfig):
        self.config = config
        self.arch = get_arch(config.arch)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.gdb_target = ""
        self._console_pos = 0      # bytes of the log read so far
        self._console = ""         # text read so far
        self._cursor = 0           # wait_for_line searches from here

    # -- start -------------------------------------------------------------
    def command_line(self) -> list[str]:
        """QEMU's argv for this config (the gdbstub and sockets need start())."""
        c, a = self.config, self.arch
        cmdline = f"console={a.console} panic=-1"
        if not c.kaslr:
            cmdline += " nokaslr"
        if c.drive:
            words = c.append.split()
            if not any(w.startswith("root=") for w in words):
                cmdline += " root=/dev/vda"
            if "ro" not in words and "rw" not in words:
                cmdline += " rw"
        if c.append:
            cmdline += " " + c.append
        accel = "kvm" if c.accel == "kvm" else "tcg,thread=multi"
        argv = [a.qemu_binary, *a.machine_args, "-cpu", c.cpu or a.default_cpu,
                "-accel", accel, "-nodefaults",
                "-display", "none", "-no-reboot", "-serial", "stdio", "-nic", "none",
                "-m", f"{c.memory_mib}M", "-smp", str(c.smp),
                "-object", f"memory-backend-memfd,id=ram0,size={c.memory_mib}M,share=on",
                "-machine", "memory-backend=ram0",
                "-kernel", str(c.kernel), "-append", cmdline]
        if c.initrd:
            argv += ["-initrd", str(c.initrd)]
        if c.drive:
            argv += ["-drive", f"file={_drive_path(c.drive)},format=raw,if=virtio,snapshot=on"]
        for ro in c.ro_drives:
            argv += ["-drive", f"file={_drive_path(ro)},format=raw,if=virtio,readonly=on"]
        return argv + list(c.extra_args)

    def _check_inputs(self) -> None:
        c = self.config
        for what, path in (("kernel image", c.kernel), ("initrd", c.initrd), ("disk image", c.drive),
                           *(("disk image", d) for d in c.ro_drives)):
            if path is not None and not Path(path).is_file():
                raise LaunchError(f"{what} not found: {path}",
                                  "check the path, or run `make images` for the default guests")
        if shutil.which(self.arch.qemu_binary) is None:
            raise LaunchError(f"{self.arch.qemu_binary} not found",
                              "install QEMU (`make setup` does it)")
        if c.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise LaunchError("KVM asked for but /dev/kvm is not usable", "use --accel tcg")

    def start(self, timeout: float = 20.0) -> "VM":
        """Start QEMU and wait until its gdbstub and monitor are listening."""
        self._check_inputs()
        self.workdir = Path(tempfile.mkdtemp(prefix="qemuleak-"))
        argv = self.command_line()
        argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.config.gdb == "tcp":
            port = _free_port()
            argv += ["-gdb", f"tcp:127.0.0.1:{port}"]
            self.gdb_target = f"127.0.0.1:{port}"
        else:
            gdb_sock = self.workdir / "gdb.sock"
            argv += ["-gdb", f"unix:{gdb_sock},server=on,wait=off"]
            self.gdb_target = f"unix:{gdb_sock}"
        (self.workdir / "cmdline").write_text(" ".join(argv) + "\n")
        self._log = open(self.console_path, "wb")
        self._err = open(self.workdir / "qemu.stderr", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=self._err, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while not self._qmp_ready():
            if self.proc.poll() is not None:
                err = self.stderr_text().strip().splitlines()
                self.shutdown()
                raise LaunchError(f"QEMU exited at start (code {self.proc.returncode}): "
                                  + (err[-1] if err else "no message"))
            if time.monotonic() > deadline:
                self.shutdown()
                raise LaunchError(f"QEMU did not open its monitor within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _qmp_ready(self) -> bool:
        if not self.qmp_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.qmp_path))
            return True
        except OSError:
            return False

    def ram_fd_path(self) -> Path:
        """/proc path of QEMU's memfd holding guest RAM: open and mmap it to read RAM."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd).startswith("/memfd:"):
                    return fd
            except OSError:
                continue
        raise LaunchError(f"QEMU (pid {self.pid}) has no guest RAM memfd")

    # -- console -----------------------------------------------------------
    def _read_console(self) -> None:
        with open(self.console_path, "rb") as f:
            f.seek(self._console_pos)
            data = f.read()
        # Keep a partial UTF-8 sequence for the next read.
        cut = len(data)
        while cut and len(data) - cut < 4 and data[cut - 1] & 0xC0 == 0x80:
            cut -= 1
        if cut and data[cut - 1] >= 0xC0:
            cut -= 1
        if cut == 0 and data:
            cut = len(data)
        self._console_pos += cut
        self._console += data[:cut].decode("utf-8", "replace").replace("\r\n", "\n")

    def console_text(self) -> str:
        """Everything the guest has printed so far."""
        self._read_console()
        return self._console

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console_text().rstrip("\n").splitlines()[-lines:])

    def panic_reason(self) -> str:
        """', the guest kernel panicked: WHY' if the console shows a panic, else ''."""
        found = re.findall(r"Kernel panic - not syncing: (.*)", self._console)
        return f", the guest kernel panicked: {found[-1].strip()}" if found else ""

    def stderr_text(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_line(self, pattern: str | re.Pattern, timeout: float = 60.0) -> re.Match:
        """Wait for a console line matching `pattern` (a regex, or a plain substring)
        printed after the last line matched; return the match.

        LaunchError, with the console tail, on timeout or if QEMU exits first.
        """
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            self._read_console()
            # Only whole lines: a line is complete when its newline has arrived.
            end = self._console.rfind("\n") + 1
            m = rx.search(self._console, self._cursor, end)
            if m:
                self._cursor = self._console.find("\n", m.end()) + 1
                return m
            if self.proc.poll() is not None:
                self._read_console()
                raise LaunchError(f"QEMU exited (code {self.proc.returncode}) before the guest "
                                  f"printed {rx.pattern!r}{self.panic_reason()}; "
                                  f"console tail:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"guest did not print {rx.pattern!r} within {timeout:.0f} s; "
                                  f"console tail:\n{self.console_tail()}")
            time.sleep(0.02)

    def send_line(self, text: str) -> None:
        """Type one line on the guest's serial console."""
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise LaunchError("the guest's console is closed (QEMU exited)") from None

    # -- stop --------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qmp(self, command: str, timeout: float = 5.0) -> dict:
        """Send one QMP command (after the capabilities handshake); its reply."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            f.readline()                               # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:                            # skip events until the answer
                    reply = json.loads(f.readline() or b"{}")
                    if "return" in reply or "error" in reply or not reply:
                        break
            return reply

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop QEMU: monitor quit, then SIGTERM, then SIGKILL; remove our files."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.qmp("quit", timeout=timeout / 2)
            except (OSError, ValueError):
                pass
            for sig, wait in ((None, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5)):
                if sig is not None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            for f in (self.proc.stdin, getattr(self, "_log", None), getattr(self, "_err", None)):
                try:
                    f and f.close()
                except OSError:
                    pass
        _LIVE.discard(self)
        if self.workdir is not None and self.workdir.exists() and not os.environ.get("QEMULEAK_KEEP"):
            self._read_console_safely()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _read_console_safely(self) -> None:
        try:
            self._read_console()
        except OSError:
            pass

    def __enter__(self) -> "VM":
        return self if self.proc else self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _drive_path(path: Path) -> str:
    """A file name for -drive file=...: QEMU's option syntax doubles commas."""
    return str(path).replace(",", ",,")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_LIVE):
        vm.shutdown(timeout=2)
