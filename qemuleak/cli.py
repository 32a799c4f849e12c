"""Command line: thin argparse layer over the modules that do the work.

Every user-facing error is a QemuleakError: printed as one line (and a hint),
exit code 2. --debug shows the traceback instead.
"""

import argparse
import sys

from . import __version__
from .errors import QemuleakError

EXIT_OK, EXIT_LEAKS, EXIT_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qemuleak",
        description="Find kernel memory leaks in a QEMU guest from the host: "
                    "trace allocations through QEMU's gdbstub, freeze the guest, "
                    "and run kmemleak's reachability scan on its memory.",
    )
    ap.add_argument("--version", action="version", version=f"qemuleak {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "info", help="show what runs in a guest: kernel, KASLR offset, vCPUs, modules",
        description="Attach to a QEMU gdbstub, identify the guest kernel and print its "
                    "arch, banner, KASLR offset, memory backend, RAM, the task on each "
                    "vCPU and the loaded modules. The guest is left running (or stopped) "
                    "as it was found.")
    add_target_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "trace", help="trace allocations for a while; show what is still allocated",
        description="Put breakpoints on the guest kernel's allocation and free functions "
                    "and keep a table of live objects; when the time is up (or on "
                    "Ctrl-C), print the live objects grouped by call site. Every "
                    "breakpoint is removed and the guest left running.")
    add_target_args(p)
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                   help="how long to trace (default 10; 0: until Ctrl-C)")
    p.add_argument("--top", type=int, default=10, help="call sites to show (default 10)")
    g = p.add_argument_group(
        "scan", "With --scan, when tracing ends the guest is frozen (registers and a copy "
                "of RAM), let run again, and kmemleak's reachability scan runs on the copy: "
                "objects allocated while tracing that nothing points to are reported, in "
                "the layout of /sys/kernel/debug/kmemleak. No 5 s grace is needed: the "
                "guest is frozen and its registers are scanned, so --min-age defaults to 0.")
    g.add_argument("--scan", action="store_true", help="scan for leaks when tracing ends")
    add_report_args(g)
    g.add_argument("--dump", metavar="ADDR", type=lambda v: int(v, 0),
                   help="also print one object's full record, like kmemleak's dump=ADDR")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser(
        "attach", help="trace a running guest and scan it for leaks until Ctrl-C",
        description="Attach to a running QEMU (started with -s or -gdb), trace every "
                    "allocation and free from now on, and scan for leaks every "
                    "--scan-interval seconds and on request through --control (see "
                    "`qemuleak ctl`). Ctrl-C or SIGTERM: a final scan is written, every "
                    "breakpoint removed, and the guest runs on. Objects allocated before "
                    "attaching are scanned when something reaches them, and reported only "
                    "with --all. "
                    "Exit code: 0 no leaks, 1 leaks, 2 error.")
    add_target_args(p)
    p.add_argument("--scan-interval", type=float, default=600.0, metavar="SECONDS",
                   help="scan this often (default 600, like kmemleak; 0: only on request "
                        "and at the end)")
    p.add_argument("--control", metavar="PATH",
                   help="control socket (mode 0600) for `qemuleak ctl PATH COMMAND`")
    add_report_args(p)
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser(
        "run", help="boot a guest, run commands in it, report leaks (for CI)",
        description="Boot a guest under QEMU, attach and trace before the workload, run "
                    "the commands in the guest's console shell (sh -e: the first failing "
                    "command fails the run), scan whenever the guest runs `qemuleak-scan "
                    "[LABEL]` and once more (label 'final') when the commands are done, "
                    "then shut the guest down. Exit code: 0 no leaks, 1 leaks, 2 error "
                    "(guest panic, timeout, a failing guest command, bad input).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-c", dest="commands", metavar="'GUEST COMMANDS'",
                      help="shell commands to run in the guest")
    what.add_argument("--script", metavar="FILE", help="a shell script to run in the guest")
    p.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64")
    p.add_argument("--kernel", metavar="IMAGE",
                   help="kernel image (default: the one `make images` builds for --arch)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--vmlinux", metavar="FILE", help="the kernel's vmlinux")
    sym.add_argument("--system-map", metavar="FILE", help="the kernel's System.map")
    p.add_argument("--initrd", metavar="FILE",
                   help="initramfs with a shell on the serial console (default: the "
                        "busybox one `make images` builds; none with --drive); without "
                        "--drive qemuleak appends its files, with it the initrd is used as is")
    p.add_argument("--drive", metavar="ROOTFS.ext2",
                   help="raw root disk image (e.g. buildroot's rootfs.ext2) as the first "
                        "virtio disk, root=/dev/vda rw (a root=, ro or rw in --append wins); the "
                        "image is never changed (snapshot); qemuleak's files come on a "
                        "second disk that the guest unpacks into its root (busybox tar)")
    p.add_argument("--module", action="append", default=[], metavar="F.ko",
                   help="copy into the guest as /modules/NAME.ko (repeatable)")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    p.add_argument("--memory", type=int, default=512, metavar="MiB", help="guest RAM (512)")
    p.add_argument("--smp", type=int, default=2, metavar="N", help="vCPUs (2)")
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="boot plus commands must end within this (default 600)")
    p.add_argument("--console", metavar="FILE", help="write the guest's whole console log here")
    add_report_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "scan", help="scan a running guest once, with no tracing (best with slub_debug=U)",
        description="Attach, copy the guest's RAM (it stands still only for the copy), "
                    "find every allocated slab object from SLUB's own structures, and run "
                    "kmemleak's scan: objects nothing points to are reported. When the "
                    "guest was booted with slub_debug=U, SLUB's allocation tracks give "
                    "each leak its backtrace, pid, cpu and age; without them leaks have no "
                    "backtrace. Slab objects are the candidates (and vmalloc areas with --all); "
                    "per-CPU areas are scanned, never reported; other memory (page "
                    "tables, page cache) counts as roots. Exit code: 0 no leaks, 1 leaks, "
                    "2 error.")
    add_target_args(p)
    p.add_argument("--label", default="scan", help="the scan's label in the report")
    add_report_args(p, untracked=False)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser(
        "ctl", help="send a command to a running `qemuleak attach --control PATH`",
        description="Commands, as kmemleak's debugfs file takes them: 'scan [LABEL]' (waits "
                    "for the scan and prints its summary), 'clear' (forget the leaks "
                    "reported so far), 'dump=ADDR', 'stack=on|off', 'scan=SECS' (periodic "
                    "scan interval), 'scan=off', 'report' (the report so far), 'off' "
                    "(final scan, detach).")
    p.add_argument("path", metavar="PATH", help="the control socket")
    p.add_argument("command", metavar="COMMAND", nargs="+")
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser(
        "resume", help="let a guest run that a killed debugger left stopped",
        description="For a guest that a killed qemuleak (or gdb) left stopped: QEMU keeps "
                    "a dead debugger's breakpoints. Make it drop them all, on every vCPU, "
                    "and let the guest run.")
    p.add_argument("target", metavar="TARGET", help="HOST:PORT, :PORT or unix:PATH")
    p.set_defaults(func=cmd_resume)
    return ap


def add_target_args(p: argparse.ArgumentParser) -> None:
    """TARGET and how to read the guest: shared by every command that attaches."""
    p.add_argument("target", metavar="TARGET",
                   help="QEMU's gdbstub: HOST:PORT, :PORT (127.0.0.1) or unix:PATH "
                        "(start QEMU with -s for :1234, or -gdb tcp::PORT)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--vmlinux", metavar="FILE",
                     help="the guest kernel's vmlinux (symbols, DWARF types, file:line)")
    sym.add_argument("--system-map", metavar="FILE",
                     help="the guest kernel's System.map (types then come from its BTF)")
    p.add_argument("--backend", choices=("auto", "proc-mem", "gdbstub"), default="auto",
                   help="how to read guest RAM (default: /proc/<qemu>/mem when QEMU runs "
                        "here and may be read, else the gdbstub)")


def _absolute_dir(path: str) -> str:
    """--source-root: an existing directory, made absolute."""
    import argparse
    from pathlib import Path
    p = Path(path)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such directory")
    return str(p.resolve())


def add_report_args(p, untracked: bool = True) -> None:
    """What a scan covers and how it is reported: shared by trace, attach and run."""
    from .formats import FORMATS
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="kmemleak text (default), summary (grouped by backtrace), json, "
                        "sarif (2.1.0, for code scanning) or junit (one test case per scan)")
    p.add_argument("--output", metavar="FILE",
                   help="write the report here (rewritten atomically after every scan, "
                        "so it is always whole); default stdout")
    p.add_argument("--suppressions", metavar="FILE",
                   help="LeakSanitizer-style file: 'leak:PATTERN' lines matched against "
                        "function and module names in backtraces (* wildcards, ^ $ anchors)")
    p.add_argument("--module-filter", metavar="NAME",
                   help="only leaks whose backtrace passes through module NAME")
    p.add_argument("--source-root", metavar="DIR", type=_absolute_dir,
                   help="sarif: source files under DIR (your checkout's top) are given "
                        "relative to it (uriBaseId %%SRCROOT%%), as GitHub code scanning "
                        "needs to show a leak in its file")
    p.add_argument("--min-age", type=float, default=0.0, metavar="SECONDS",
                   help="only leaks at least this old (guest time; default 0: the guest is "
                        "frozen and its registers scanned, so kmemleak's 5 s grace is not "
                        "needed)")
    p.add_argument("--stack", choices=("on", "off"), default="on",
                   help="scan task stacks (the live part, above each stack pointer)")
    p.add_argument("--all", action="store_true", dest="all_objects",
                   help="also report unreferenced objects allocated before qemuleak "
                        "attached (from the SLUB and vmalloc inventories: no comm or "
                        "age; the backtrace is vmalloc's caller or unknown)")
    if not untracked:
        return
    p.add_argument("--provenance", choices=("auto", "tracks", "breakpoints"), default="auto",
                   help="where each object's comm, pid, age and backtrace come from: SLUB's "
                        "allocation tracks (slub_debug=U; one breakpoint, on module loads, "
                        "and vmalloc, per-CPU and the rest while a module's init runs: the "
                        "guest runs at nearly full speed) or breakpoints on every allocation "
                        "and free; auto (default): tracks when the guest keeps them")
    p.add_argument("--untracked", choices=("roots", "ignore"), default="roots",
                   help="memory allocated before tracing began: 'roots' (default) treats "
                        "it as roots, so nothing it points to is reported; 'ignore' scans "
                        "only kmemleak's roots (data, bss, per-CPU, modules, stacks), "
                        "which finds more but reports what only older objects point to")


def cmd_info(args) -> int:
    from .info import describe, format_text, to_json
    d = describe(args.target, vmlinux=args.vmlinux, system_map=args.system_map,
                 backend=args.backend)
    print(to_json(d) if args.json else format_text(d))
    return EXIT_OK


def cmd_trace(args) -> int:
    from .trace_cmd import run_trace
    return run_trace(args.target, args.duration, vmlinux=args.vmlinux,
                     system_map=args.system_map, backend=args.backend, top=args.top,
                     scan=report_options(args) if args.scan else None, dump=args.dump)


def report_options(args):
    """ReportOptions from the scan/report arguments every command shares."""
    from .report import Suppressions
    from .session import ReportOptions
    return ReportOptions(args.format, args.output,
                         Suppressions.load(args.suppressions) if args.suppressions else None,
                         args.module_filter, args.min_age, args.stack == "on",
                         getattr(args, "untracked", "roots"), args.all_objects,
                         getattr(args, "provenance", "auto"), args.source_root)


def cmd_attach(args) -> int:
    from .attach_cmd import attach
    return attach(args.target, report_options(args), args.scan_interval, args.control,
                  vmlinux=args.vmlinux, system_map=args.system_map, backend=args.backend)


def cmd_run(args) -> int:
    from pathlib import Path
    from .run_cmd import RunOptions, read_script, run
    path = lambda v: Path(v) if v else None      # noqa: E731
    opts = RunOptions(args.commands if args.commands is not None else read_script(args.script),
                      args.arch, path(args.kernel), path(args.vmlinux), path(args.system_map),
                      path(args.initrd), [Path(m) for m in args.module], args.append,
                      args.memory, args.smp, args.accel, args.timeout, path(args.console),
                      path(args.drive))
    return run(opts, report_options(args))


def cmd_scan(args) -> int:
    from .scan_cmd import run_scan
    return run_scan(args.target, report_options(args), args.label, vmlinux=args.vmlinux,
                    system_map=args.system_map, backend=args.backend)


def cmd_ctl(args) -> int:
    from .control import ctl_main
    return ctl_main(args.path, " ".join(args.command))


def cmd_resume(args) -> int:
    from .trace_cmd import resume
    return resume(args.target)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return EXIT_ERROR
    try:
        return args.func(args)
    except QemuleakError as e:
        if args.debug:
            raise
        print(f"qemuleak: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"qemuleak: hint: {e.hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qemuleak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
