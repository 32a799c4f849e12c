#!/usr/bin/env python3
"""Boot and initramfs figures for the test guests, side by side in one run.

    .venv/bin/python tools/bench_boot.py [--runs N]

Prints, per arch: time to compose a guest initramfs from scratch (busybox base and
modules) vs. from the cached base, and boot-to-ready-marker time under TCG.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuleak import initramfs  # noqa: E402
from qemuleak.images import find_image  # noqa: E402
from qemuleak.launch import VM, VMConfig  # noqa: E402


def timed(fn, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for arch in ("x86_64", "arm64"):
        image = find_image(arch)
        files = initramfs.module_files([image.module("leaky"), image.module("allocstorm")])
        with tempfile.TemporaryDirectory() as tmp:
            base, out = Path(tmp) / "base.gz", Path(tmp) / "initrd.gz"
            cold = timed(lambda: initramfs.compose(initramfs.build_base(image.busybox, base),
                                                   out, files), args.runs)
            warm = timed(lambda: initramfs.compose(image.base_initramfs, out, files), args.runs)

            def boot():
                with VM(VMConfig(kernel=image.kernel, arch=arch, initrd=out, smp=2)) as vm:
                    vm.wait_for_line(initramfs.READY_MARKER, timeout=120)
            boot_s = timed(boot, args.runs)
        print(f"{arch:7} initramfs: from scratch {cold * 1000:7.1f} ms, cached base "
              f"{warm * 1000:6.1f} ms ({cold / warm:4.1f}x faster); "
              f"boot to ready (TCG, 2 vCPUs, 512 MiB): {boot_s:4.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
