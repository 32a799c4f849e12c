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
    ap.add_subparsers(dest="command", metavar="COMMAND")
    return ap


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
