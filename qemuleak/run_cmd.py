"""`qemuleak run`: boot a guest, trace it from before the workload on, run the
workload in the guest's shell, scan when the guest asks and when it is done, shut
the guest down. For CI: exit 0 no leaks, 1 leaks, 2 error (guest panic, timeout,
a guest command failing), with the console tail shown.

The workload is a shell script, /qemuleak/run.sh, run with `sh -e` on the
console. The guest asks for a scan with `qemuleak-scan [LABEL]` (SCAN_SCRIPT):
it prints a request line on the console and waits for the host's answer on the
console's input, so the scan sees the guest exactly at that point.

The script, /bin/qemuleak-scan and /modules/NAME.ko reach the guest in an
archive appended to its initramfs; or, when its root is a disk (--drive, e.g. a
buildroot rootfs.ext2), on a second, read-only disk holding a tar archive that
the guest unpacks into its root before tracing starts (the root disk is attached
with snapshot=on, so the image file is never changed). Either way the guest sees
the same paths.
"""

import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs, provenance
from .errors import GuestConnectionError, LaunchError, QemuleakError
from .guest import Guest
from .images import find_image
from .kofile import check_modules
from .kernel.kernel import Kernel
from .launch import VM, VMConfig
from .session import ReportOptions, Session, scan_line
from .tracer import tracing

SCAN_REQUEST = re.compile(r"^qemuleak-scan-request:(\S+)\s*$", re.M)
DONE = re.compile(r"^qemuleak-run-exit:(\d+)\s*$", re.M)
UNPACKED = re.compile(r"^qemuleak-unpacked:(\d+)\s*$", re.M)
INIT_STARTED = re.compile(r"Run \S+ as init process|Freeing unused kernel|"
                          + re.escape(initramfs.READY_MARKER))
INIT_GRACE = 30.0
ANSWER = "y"
FILES_DISK = "/dev/vdb"      # the files' disk, after the root disk (/dev/vda)
EXECUTABLES = ("bin/qemuleak-scan",)

# Installed as /bin/qemuleak-scan. Copy it into your own initrd or disk image to
# use `qemuleak-scan` there (the commands must run on the serial console).
SCAN_SCRIPT = """#!/bin/sh
# qemuleak-scan [LABEL]: ask `qemuleak run` (on the host) for a leak scan now,
# and wait until the host has taken its snapshot.
echo "qemuleak-scan-request:${1:-scan}"
read -r answer
[ "$answer" = "%s" ]
""" % ANSWER


@dataclass
class RunOptions:
    commands: str                        # shell text run in the guest with `sh -e`
    arch: str = "x86_64"
    kernel: Path | None = None           # default: the image `images/` builds
    vmlinux: Path | None = None
    system_map: Path | None = None
    initrd: Path | None = None
    modules: list[Path] = field(default_factory=list)
    append: str = ""
    memory_mib: int = 512
    smp: int = 2
    accel: str = "tcg"
    timeout: float = 600.0
    console: Path | None = None          # the whole console log is written here
    drive: Path | None = None            # root disk image (/dev/vda, root=/dev/vda rw)


def run(opts: RunOptions, report: ReportOptions, out=sys.stdout, err=sys.stderr) -> int:
    """Boot, trace, run the workload, scan; the exit code."""
    kernel, initrd, symbols = _guest_files(opts)
    for what, path in (("kernel image", kernel), ("initrd", initrd),
                       ("disk image (--drive)", opts.drive),
                       *(("module", m) for m in opts.modules),
                       ("vmlinux", symbols["vmlinux"]), ("System.map", symbols["system_map"])):
        if path is None:
            continue
        if not Path(path).is_file():
            raise QemuleakError(f"{what} not found: {path}", "check the path")
    check_modules(opts.modules, opts.arch, kernel)          # before anything boots
    with tempfile.TemporaryDirectory(prefix="qemuleak-run-") as tmp:
        files = {"bin/qemuleak-scan": SCAN_SCRIPT.encode(),
                 "qemuleak/run.sh": opts.commands.encode(),
                 **initramfs.module_files([Path(m) for m in opts.modules])}
        config = VMConfig(kernel=kernel, arch=opts.arch, initrd=initrd,
                          append=boot_append(opts.append, report.provenance),
                          memory_mib=opts.memory_mib, smp=opts.smp, accel=opts.accel)
        if opts.drive is None:       # the files ride in the initramfs...
            config.initrd = initramfs.compose(initrd, Path(tmp) / "initrd", files, EXECUTABLES)
        else:                        # ...or on a disk of their own (the user's initrd may
            config.drive = Path(opts.drive)          # switch_root away from the initramfs)
            config.ro_drives = (initramfs.write_tar_disk(Path(tmp) / "files.tar", files,
                                                         EXECUTABLES),)
        vm = VM(config)
        try:
            print(f"qemuleak: booting {kernel.name} ({opts.arch}, {opts.smp} vCPUs, "
                  f"{opts.memory_mib} MiB, {opts.accel})", file=err, flush=True)
            vm.start()
            return _run_in(vm, opts, report, symbols, out, err)
        finally:
            if opts.console is not None:
                Path(opts.console).write_text(vm.console_text() if vm.proc else "")
            vm.shutdown()


def boot_append(append: str, provenance_mode: str) -> str:
    """The kernel command line: the user's, plus allocation tracks on the kmalloc
    caches (provenance.RUN_SLUB_DEBUG) unless it sets slub_debug itself or
    breakpoints were asked for."""
    if provenance_mode == "breakpoints" or re.search(r"(^|\s)slub_debug(=|\s|$)", append):
        return append
    return f"{append} {provenance.RUN_SLUB_DEBUG}".strip()


def _guest_files(opts: RunOptions) -> tuple[Path, Path | None, dict]:
    """(kernel, initrd, symbol arguments for Kernel.open): given, or the image's. A
    guest with a root disk gets no initrd unless one is given."""
    symbols = {"vmlinux": opts.vmlinux, "system_map": opts.system_map}
    initrd = Path(opts.initrd) if opts.initrd is not None else None
    if opts.kernel is not None and (initrd is not None or opts.drive is not None):
        return Path(opts.kernel), initrd, symbols
    image = find_image(opts.arch)
    if opts.kernel is None and opts.vmlinux is None and opts.system_map is None:
        symbols["system_map"] = image.system_map
    if initrd is None and opts.drive is None:
        initrd = image.base_initramfs
    return Path(opts.kernel or image.kernel), initrd, symbols


def _run_in(vm: VM, opts: RunOptions, options: ReportOptions, symbols: dict, out, err) -> int:
    started = time.monotonic()
    _wait_for_shell(vm, deadline=started + opts.timeout)
    if vm.config.ro_drives:
        _unpack_files(vm, deadline=started + opts.timeout)
    print(f"qemuleak: guest shell up in {time.monotonic() - started:.1f} s; attaching",
          file=err, flush=True)
    with Guest.connect(vm.gdb_target, ram_path=vm.ram_fd_path()) as guest:
        kernel = Kernel.open(guest, **symbols)
        session = Session(kernel, options, out, debug_files=opts.modules)
        mark = len(vm.console_text())
        try:
            status = _workload(vm, session, started + opts.timeout, err)
        except GuestConnectionError:
            _check_panic(vm, wait=5.0)          # the guest died: say why
            raise
        guest.was_running = True
    if status != 0:
        text = vm.console_text()[mark:]
        failed = TRACED.findall(ESCAPES.sub("", text))
        what = f": `{failed[-1]}` exited with status {status}" if failed else \
            f" (the script exited with status {status})"
        raise LaunchError(f"a guest command failed{what}; console tail:\n{workload_tail(text)}")
    if options.output is None:
        out.write(session.report_text())
    return 1 if session.leaks_reported else 0


def _wait_for_shell(vm: VM, deadline: float) -> None:
    """Until a shell answers on the console: type a probe every 2 s (works for
    any initrd's shell, ours prints a marker but others need not).

    On a PL011 console (ttyAMA, arm64 virt) typing starts only once the kernel
    says it runs init (the console is open by then), or after INIT_GRACE s for a
    quiet kernel: input that piles up in QEMU's PL011 before the kernel opens the
    console can leave its receive interrupt stuck off, and the guest never reads
    the console again. (The 8250's receive interrupt is level-triggered: no wait.)"""
    if vm.arch.console.startswith("ttyAMA"):
        try:
            vm.wait_for_line(INIT_STARTED,
                             timeout=max(min(INIT_GRACE, deadline - time.monotonic()), 0))
        except LaunchError:
            _check_panic(vm)            # raises, saying why, if the guest died
    n = 0
    while time.monotonic() < deadline:
        n += 1
        vm.send_line(f"echo qemuleak-shell-{n}$((6*7))")
        try:
            vm.wait_for_line(re.compile(r"^qemuleak-shell-\d+42\s*$", re.M), timeout=2.0)
            return
        except LaunchError:
            _check_panic(vm)            # raises, saying why, if the guest died
    raise LaunchError("the guest's shell did not answer on the console in time; "
                      f"console tail:\n{vm.console_tail()}",
                      "is there a shell on the serial console? raise --timeout?")


def _unpack_files(vm: VM, deadline: float) -> None:
    """Unpack the files' disk into the guest's root, before tracing starts."""
    vm.send_line(f"tar -xf {FILES_DISK} -C /; echo qemuleak-unpacked:$?")
    try:
        status = int(vm.wait_for_line(UNPACKED, timeout=max(deadline - time.monotonic(), 1))
                     .group(1))
    except LaunchError:
        _check_panic(vm)
        raise
    if status != 0:
        raise LaunchError(f"the guest could not unpack qemuleak's files (tar -xf {FILES_DISK} "
                          f"-C / exited with status {status}); console tail:\n"
                          f"{vm.console_tail()}",
                          "the guest needs tar, devtmpfs (or a /dev/vdb node) and a "
                          "writable root")


def _check_panic(vm: VM, wait: float = 0.0) -> None:
    """LaunchError if the guest panicked or QEMU exited (waiting up to `wait` s
    for QEMU to exit)."""
    deadline = time.monotonic() + wait
    while vm.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    vm.console_text()
    reason = vm.panic_reason()
    if reason or not vm.alive():
        hint = None
        if "root fs" in reason:      # "VFS: Unable to mount root fs on ..."
            hint = ("with --drive the kernel needs virtio_blk and the root's file system "
                    "built in, or an --initrd that loads them and mounts root=/dev/vda")
        raise LaunchError(f"the guest died{reason or ' (QEMU exited)'}; "
                          f"console tail:\n{vm.console_tail()}", hint)


def _workload(vm: VM, session: Session, deadline: float, err) -> int:
    """Trace while the script runs; scan at each request and at the end. The
    script's exit status."""
    tracer = session.tracer
    print(f"qemuleak: {session.describe()}; running the guest commands", file=err, flush=True)
    seen = len(vm.console_text())
    events: list[re.Match] = []
    last_check = last_status = 0.0

    def until() -> bool:
        nonlocal seen, last_check, last_status
        now = time.monotonic()
        if now - last_check < 0.05:
            return False
        last_check = now
        if now - last_status >= 10:
            last_status = now
            print(f"qemuleak: {session.status()}", file=err, flush=True)
        text = vm.console_text()
        end = text.rfind("\n") + 1
        if end > seen:
            chunk, seen = text[seen:end], end
            events.extend(sorted([*SCAN_REQUEST.finditer(chunk), *DONE.finditer(chunk)],
                                 key=lambda m: m.start()))
        return bool(events) or now > deadline or bool(vm.panic_reason()) or not vm.alive()

    with tracing(tracer):
        # -x: each command is printed before it runs, so a failure can be named
        vm.send_line(f"PS4='{TRACE_PREFIX}' sh -ex /qemuleak/run.sh; echo qemuleak-run-exit:$?")
        while True:
            tracer.run(until)
            if tracer.interrupted:
                raise KeyboardInterrupt
            _check_panic(vm)
            if not events:
                raise LaunchError(f"the guest commands did not finish in time; console "
                                  f"tail:\n{vm.console_tail()}", "raise --timeout")
            event = events.pop(0)
            if event.re is DONE:
                status = int(event.group(1))
                if status == 0:
                    _scan(session, "final", err)
                return status
            _scan(session, event.group(1), err)
            vm.send_line(ANSWER)


TRACE_PREFIX = "qemuleak-cmd: "
TRACED = re.compile(rf"^{TRACE_PREFIX}(.*?)\s*$", re.M)
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")     # the shell's line editing (cursor queries)


def workload_tail(text: str, lines: int = 25) -> str:
    """The last `lines` of the console since the commands started, without
    qemuleak's own lines (the command it typed, the shell's trace of each
    command, scan requests, the exit marker) and terminal escapes."""
    out = []
    for line in ESCAPES.sub("", text).splitlines():
        if line.startswith((TRACE_PREFIX, "qemuleak-scan-request:")) or \
                "qemuleak-run-exit:" in line:
            continue
        out.append(line.rstrip())
    return "\n".join(out[-lines:])


def _scan(session: Session, label: str, err) -> None:
    done = session.scan(label)
    print(f"qemuleak: {scan_line(done)}", file=err, flush=True)


def read_script(path: str) -> str:
    """The text of a --script file, or a clear error."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise QemuleakError(f"cannot read the script {path}: {e.strerror}",
                            "--script takes a file of shell commands to run in the guest; "
                            "or give them with -c") from None

