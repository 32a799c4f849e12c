"""Where the guest images built by `images/build.py` live, and how to find them.

Layout: ${QEMULEAK_CACHE:-~/.cache/qemuleak}/images/<arch>/<kernel-release>/ holds
the kernel, the debug vmlinux, System.map, config, busybox, the base initramfs, the
test modules, and a disk-root guest (a busybox rootfs.ext2 and the loader initrd that
loads the kernel's virtio_blk module and switch_roots into it), described by
manifest.json. Kernels come in series (SERIES: "6.1", Debian 12's own kernel,
"6.12", its LTS backport, and "6.1-tiny", built from source without ftrace);
images/<arch>/current-<series> names the release of that series built last, the guest
for that arch and series. The default series is
$QEMULEAK_SERIES, else DEFAULT_SERIES; a plain images/<arch>/current (written by older
builds, and still for the default series) is read when current-<series> is missing.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .arch import get_arch
from .errors import ImageError

MANIFEST = "manifest.json"
# series -> the Debian metapackage (format arch = Debian arch) that names its newest ABI
# except "6.1-tiny": a kernel without ftrace built from the linux-source-6.1 package
# (images/kernel_build.py: tinyconfig plus images/noftrace/*.config)
SERIES = {"6.1": "linux-image-cloud-{arch}", "6.12": "linux-image-6.12-cloud-{arch}",
          "6.1-tiny": "linux-source-6.1"}
DEFAULT_SERIES = "6.1"


def default_series() -> str:
    """$QEMULEAK_SERIES if set, else DEFAULT_SERIES."""
    return check_series(os.environ.get("QEMULEAK_SERIES") or DEFAULT_SERIES)


def check_series(series: str) -> str:
    if series not in SERIES:
        raise ImageError(f"unknown kernel series {series!r}",
                         "one of " + ", ".join(SERIES))
    return series


def current_file(arch: str, series: str) -> Path:
    """images/<arch>/current-<series>: names the release of `series` built last."""
    return arch_dir(arch) / f"current-{series}"


def cache_root() -> Path:
    """The cache directory: $QEMULEAK_CACHE, else ~/.cache/qemuleak."""
    env = os.environ.get("QEMULEAK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qemuleak"


def arch_dir(arch: str) -> Path:
    return cache_root() / "images" / get_arch(arch).name


@dataclass(frozen=True)
class GuestImage:
    """One built guest: every path is absolute and exists."""

    arch: str
    release: str          # e.g. 6.1.0-56-cloud-amd64
    version: str          # Debian package version, e.g. 6.1.192-2
    kernel: Path
    vmlinux: Path
    system_map: Path
    config: Path
    busybox: Path
    base_initramfs: Path  # gzip'd newc cpio: busybox and /init
    modules: dict[str, Path]
    rootfs: Path | None = None         # busybox ext2 root file system for --drive (root=/dev/vda)
    loader_initrd: Path | None = None  # initrd: insmod virtio_blk (+ deps), switch_root to /dev/vda
    series: str = DEFAULT_SERIES

    def module(self, name: str) -> Path:
        try:
            return self.modules[name]
        except KeyError:
            raise ImageError(f"no module {name!r} in the {self.arch} image",
                             "run `make images`") from None


def write_manifest(directory: Path, image: GuestImage) -> None:
    data = {k: str(v) for k, v in image.__dict__.items() if k != "modules" and v is not None}
    data["modules"] = {k: str(v) for k, v in image.modules.items()}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def find_image(arch: str = "x86_64", series: str | None = None) -> GuestImage:
    """The guest image for `arch` of kernel `series` (default: default_series()), or
    ImageError saying how to build it."""
    name = get_arch(arch).name
    series = check_series(series or default_series())
    hint = "run `make images` (or `python images/build.py --arch %s --series %s`)" % (name, series)
    candidates = [current_file(name, series)]
    if series == DEFAULT_SERIES:
        candidates.append(arch_dir(name) / "current")
    data = None
    for current in candidates:
        try:
            release = current.read_text().strip()
            data = json.loads((arch_dir(name) / release / MANIFEST).read_text())
            break
        except (OSError, ValueError):
            continue
    if data is None:
        raise ImageError(f"no {name} guest image of kernel series {series} in {arch_dir(name)}",
                         hint)
    modules = {k: Path(v) for k, v in data.pop("modules").items()}
    text = ("arch", "release", "version", "series")
    image = GuestImage(modules=modules, **{k: (Path(v) if k not in text else v)
                                          for k, v in data.items()})
    for path in [image.kernel, image.vmlinux, image.system_map, image.base_initramfs,
                 *modules.values(), image.rootfs, image.loader_initrd]:
        if path is not None and not path.is_file():
            raise ImageError(f"{name} guest image is incomplete: {path} is missing", hint)
    return image
