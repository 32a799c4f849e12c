#!/usr/bin/env python3
"""Is the report the same from run to run? The README's CI command, repeated: each
run boots a fresh guest, loads leaky, scans ("after-insmod"), unloads it, and the
leaks leaky announced on the console are named in the report's scans; the tally
counts each distinct outcome.

    .venv/bin/python tools/repeat_run.py [--runs 20] [--arch x86_64] [-- extra run options]
"""

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak.images import find_image  # noqa: E402
from tests.groundtruth import parse_objects  # noqa: E402


def one_run(image, tmp: Path, extra: list[str]) -> tuple[str, float]:
    """The outcome: per scan, the names of leaky's objects reported (others as
    addresses), or the exit code and the error's first line."""
    out, console = tmp / "r.json", tmp / "console.log"
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "qemuleak.cli", "run", "--arch", image.arch,
                        "--module", str(image.module("leaky")),
                        "-c", "insmod /modules/leaky.ko; qemuleak-scan after-insmod; rmmod leaky",
                        "--module-filter", "leaky", "--format", "json", "--output", str(out),
                        "--console", str(console), *extra],
                       capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    if p.returncode not in (0, 1):
        return f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}", took
    names = {o.address: n for n, o in parse_objects(console.read_text()).items()}
    scans = json.loads(out.read_text())["scans"]
    return "; ".join(
        f"{s['label']}: " + ", ".join(sorted(names.get(int(x["address"], 16), x["address"])
                                             for x in s["leaks"]))
        for s in scans), took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--arch", default="x86_64", choices=("x86_64", "arm64"))
    ap.add_argument("extra", nargs="*", help="more `qemuleak run` options (after --)")
    args = ap.parse_args()
    image = find_image(args.arch)
    tally: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            outcome, took = one_run(image, Path(tmp), args.extra)
            tally[outcome] += 1
            print(f"run {i + 1}/{args.runs} ({took:.0f} s): {outcome}", flush=True)
    print(f"{len(tally)} distinct outcome(s) in {args.runs} runs:")
    for outcome, n in tally.most_common():
        print(f"  {n:3d} x  {outcome}")
    return 0 if len(tally) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
