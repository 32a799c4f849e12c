#!/usr/bin/env python3
"""`make demo`: boot the default x86_64 test guest with `qemuleak run`, load the
leaky test module while tracing, scan, and print the leak report, the way
/sys/kernel/debug/kmemleak would show it; then hold it against what leaky says
it leaked (its console lines name every object and its address)."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak.cli import main as qemuleak  # noqa: E402
from qemuleak.errors import QemuleakError  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from tests.groundtruth import LEAKY_LEAKS, parse_objects  # noqa: E402


def main() -> int:
    try:
        leaky = find_image("x86_64").module("leaky")
    except QemuleakError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        console, out = Path(tmp) / "console.log", Path(tmp) / "report.txt"
        argv = ["run", "--module", str(leaky), "-c", "insmod /modules/leaky.ko",
                "--module-filter", "leaky", "--console", str(console)]
        print("demo: qemuleak " + " ".join(a if " " not in a else repr(a) for a in argv),
              flush=True)
        code = qemuleak(argv + ["--output", str(out)])
        if code == 2:
            return 2
        text = out.read_text()
        objs = parse_objects(console.read_text())
    print(text)
    print(f"demo: leaky says it leaked {len(LEAKY_LEAKS)} objects (its console names "
          f"each one and its address):")
    for name in sorted(LEAKY_LEAKS):
        o = objs.get(name)
        seen = o is not None and f"unreferenced object {o.address:#010x} " in text
        print(f"    {name:16} {o.address if o else 0:#018x}  "
              f"{'reported' if seen else 'not reported (a stale word still points at it)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
