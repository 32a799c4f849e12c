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
    g.add_argument("--format", choices=("text", "json", "summary"), default="text",
                   help="kmemleak text (default), JSON, or leaks grouped by backtrace")
    g.add_argument("--output", metavar="FILE", help="write the report here (default stdout)")
    g.add_argument("--suppressions", metavar="FILE",
                   help="LeakSanitizer-style file: 'leak:PATTERN' lines matched against "
                        "function and module names in backtraces (* wildcards, ^ $ anchors)")
    g.add_argument("--module-filter", metavar="NAME",
                   help="only leaks whose backtrace passes through module NAME")
    g.add_argument("--min-age", type=float, default=0.0, metavar="SECONDS",
                   help="only leaks at least this old (guest time; default 0)")
    g.add_argument("--stack", choices=("on", "off"), default="on",
                   help="scan task stacks (the live part, above each stack pointer)")
    g.add_argument("--untracked", choices=("roots", "ignore"), default="roots",
                   help="memory allocated before tracing began: 'roots' (default) treats "
                        "it as roots, so nothing it points to is reported; 'ignore' scans "
                        "only kmemleak's roots (data, bss, per-CPU, modules, stacks), "
                        "which finds more but reports what only older objects point to")
    g.add_argument("--dump", metavar="ADDR", type=lambda v: int(v, 0),
                   help="also print one object's full record, like kmemleak's dump=ADDR")
    p.set_defaults(func=cmd_trace)

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


def cmd_info(args) -> int:
    from .info import describe, format_text, to_json
    d = describe(args.target, vmlinux=args.vmlinux, system_map=args.system_map,
                 backend=args.backend)
    print(to_json(d) if args.json else format_text(d))
    return EXIT_OK


def cmd_trace(args) -> int:
    from .trace_cmd import run_trace
    scan = None
    if args.scan or args.dump is not None:
        from .report import Suppressions
        from .trace_cmd import ScanRequest
        scan = ScanRequest(args.format, args.output,
                           Suppressions.load(args.suppressions) if args.suppressions else None,
                           args.module_filter, args.min_age, args.stack == "on",
                           args.untracked, args.dump)
    return run_trace(args.target, args.duration, vmlinux=args.vmlinux,
                     system_map=args.system_map, backend=args.backend, top=args.top,
                     scan=scan)


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
