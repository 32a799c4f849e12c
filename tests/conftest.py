"""Shared fixtures. Guest tests boot real QEMU guests built by `make images`.

With QEMULEAK_REQUIRE_GUEST=1 (set by .ci/run) a missing QEMU or image fails the
test instead of skipping it.

Kernel series: every guest test runs on the default series ($QEMULEAK_SERIES, else
6.1). A test marked `@pytest.mark.series("6.1", "6.12")` runs on each series named
(the chosen subset of the suite that CI runs on 6.12 too); while it runs,
QEMULEAK_SERIES names its series, so `qemuleak run` and find_image() pick it as well.
"""

import os
import shutil
import warnings
from pathlib import Path

import pytest

from qemuleak import initramfs
from qemuleak.arch import get_arch
from qemuleak.errors import ImageError, LaunchError
from qemuleak.images import SERIES, GuestImage, default_series, find_image
from qemuleak.launch import VM, VMConfig

REQUIRE_GUEST = os.environ.get("QEMULEAK_REQUIRE_GUEST") == "1"
ARCHES = ["x86_64", "arm64"]


def missing(reason: str):
    if REQUIRE_GUEST:
        pytest.fail(f"{reason} (QEMULEAK_REQUIRE_GUEST=1: run `make setup`)", pytrace=False)
    pytest.skip(reason)


def guest_image_for(arch: str, series: str | None = None) -> GuestImage:
    if shutil.which(get_arch(arch).qemu_binary) is None:
        missing(f"{get_arch(arch).qemu_binary} is not installed")
    try:
        return find_image(arch, series)
    except ImageError as e:
        missing(str(e))


def pytest_configure(config):
    config.addinivalue_line("markers", "series(*names): run the test on each kernel series "
                            "named (default: only the default series)")


def series_of(definition) -> list[str]:
    """The kernel series a test runs on: its `series` mark's, else the default."""
    marker = definition.get_closest_marker("series")
    chosen = list(marker.args) if marker else [default_series()]
    unknown = [s for s in chosen if s not in SERIES]
    if unknown:
        raise ValueError(f"unknown kernel series {unknown} in {definition.nodeid}")
    return chosen


def pytest_generate_tests(metafunc):
    if "series" in metafunc.fixturenames:
        metafunc.parametrize("series", series_of(metafunc.definition), indirect=True,
                             ids=lambda s: f"k{s}")


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def series(request, monkeypatch) -> str:
    """The kernel series of this test's guest; QEMULEAK_SERIES says it to `qemuleak run`."""
    monkeypatch.setenv("QEMULEAK_SERIES", request.param)
    return request.param


@pytest.fixture
def guest_image(arch, series) -> GuestImage:
    return guest_image_for(arch, series)


def process_gone(pid: int, workdir: Path | None) -> bool:
    """True when QEMU `pid` has exited and no process mentions its work directory."""
    if Path(f"/proc/{pid}").exists():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            state = "X"
        if state not in ("Z", "X"):
            return False
    if workdir is None:
        return True
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(workdir).encode() in cmd.read_bytes():
                return False
        except OSError:
            continue
    return True


@pytest.fixture
def boot(guest_image, tmp_path):
    """Boot the test guest with extra initramfs files; wait for the ready marker.

    Every VM started is shut down after the test, and the test fails if any QEMU
    process is left behind.
    """
    vms: list[VM] = []

    def _boot(files: dict | None = None, modules=("leaky",), **config) -> VM:
        extra = initramfs.module_files([guest_image.module(m) for m in modules])
        extra.update(files or {})
        initrd = initramfs.compose(guest_image.base_initramfs,
                                   tmp_path / f"initrd{len(vms)}.gz", extra)
        config.setdefault("smp", 2)
        for attempt in (1, 2):
            vm = VM(VMConfig(kernel=guest_image.kernel, arch=guest_image.arch,
                             initrd=initrd, **config))
            vms.append(vm)
            vm.start()
            try:
                vm.wait_for_line(initramfs.READY_MARKER, timeout=90)
                return vm
            except LaunchError as e:
                # Under TCG a boot fails once in some hundreds, before anything of
                # ours touched the guest: silent after "Switched to clocksource hpet"
                # (CI, 6.1 x86_64), an int3 oops in the kernel's own text patching at
                # boot (6.12 x86_64), the marker line cut by a kernel message. Boot
                # once more, and say so.
                if attempt == 2:
                    raise
                warnings.warn(f"guest boot failed, booting again: {str(e)[-300:]}")
                vm.shutdown()

    yield _boot
    for vm in vms:
        workdir = vm.workdir
        vm.shutdown()
        assert vm.proc is None or process_gone(vm.pid, workdir), \
            f"QEMU pid {vm.pid} still running after shutdown"


@pytest.fixture
def leaky_vm(boot):
    """A booted guest (2 vCPUs) with the leaky module loaded."""
    vm = boot(smp=2)
    vm.send_line("insmod /modules/leaky.ko")
    vm.wait_for_line("leaky: ready", timeout=60)
    return vm
